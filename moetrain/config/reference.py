"""The configuration reference, docs/config_reference.md, generated from the schemas.

    python -m moetrain.config.reference --write     # regenerate docs/config_reference.md (after a schema change)
    python -m moetrain.config.reference             # print it

Every key with its type (the annotation as written), its default, its allowed values and its meaning:
- the keys and types come from the dataclasses (`moetrain/config/schema.py`; each routing method's `RouterConfig`
  subclass in `moetrain/moe/routers/<method>.py`), read with `ast` so the annotation reads as in the source;
- the meaning is the comment beside the field, with the comment-only lines right below whose text is indented past
  the field's start (`# ...` at the field's own indentation heads the next group of fields instead), read with
  `tokenize`;
- the default is what `moetrain-train` runs with no override (configs/train.yaml and its default group options over
  the schema defaults); a routing method's own keys show their schema default;
- the allowed values come from `moetrain/config/validate.py`: `CHOICES` for string keys, the range `RULES` otherwise;
- the router presets (`configs/router/<preset>.yaml`) list the method and every value that differs from
  `router=default`.
tests/test_config_reference.py fails while the committed file differs from what this prints.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["field_docs", "render", "reference_path", "main"]

COMMAND = "python -m moetrain.config.reference --write"


@dataclasses.dataclass(frozen=True)
class FieldDoc:
    type: str  # the annotation as written in the source
    meaning: str  # the comment beside the field and its continuation lines ("" without one)


@lru_cache(maxsize=None)
def _comments(path: str) -> tuple[dict[int, tuple[int, str]], dict[int, tuple[int, str]]]:
    """(trailing, alone) comments of a source file: {line: (column of the text after "#", text)} for comments after
    code on their line and for comment-only lines."""
    trailing, alone = {}, {}
    code_lines = set()
    source = Path(path).read_text(encoding="utf-8")
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            line, col = tok.start
            after_hash = tok.string.lstrip("#")
            text_col = col + len(tok.string) - len(after_hash.lstrip())
            (trailing if line in code_lines else alone)[line] = (text_col, after_hash.strip())
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    return trailing, alone


def field_docs(cls: type) -> dict[str, FieldDoc]:
    """{field name: FieldDoc} for the fields `cls` itself declares (not the inherited ones), in source order."""
    path = inspect.getsourcefile(cls)
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    trailing, alone = _comments(path)
    docs = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        parts = [trailing[line][1] for line in range(stmt.lineno, stmt.end_lineno + 1) if line in trailing]
        line = stmt.end_lineno + 1
        while line in alone and alone[line][0] > stmt.col_offset + 2:  # continuation, not the next group's "# ..."
            parts.append(alone[line][1])
            line += 1
        docs[stmt.target.id] = FieldDoc(ast.unparse(stmt.annotation), " ".join(p for p in parts if p))
    return docs


def _fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _allowed(key: str) -> str:
    from moetrain.config.validate import CHOICES, RULES

    if key in CHOICES:
        return " \\| ".join(f"`{v}`" for v in CHOICES[key])
    texts = [rule.text for rule in RULES if rule.key == key]
    return "; ".join(_cell(t.removeprefix("must be ")) for t in texts)


def _rows(cls: type, prefix: str, defaults: Optional[dict], only_declared: bool = False) -> list[str]:
    """Table rows for the fields of `cls` (nested dataclasses flattened to dotted keys)."""
    hints = typing.get_type_hints(cls)
    docs: dict[str, FieldDoc] = {}
    for klass in reversed(cls.__mro__):  # inherited fields take their own class's source
        if dataclasses.is_dataclass(klass) and (not only_declared or klass is cls):
            docs.update(field_docs(klass))
    rows = []
    for f in dataclasses.fields(cls):
        if f.name not in docs or (only_declared and f.name == "method"):  # a method's presets name it
            continue
        key, doc = f"{prefix}{f.name}", docs[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            sub = (defaults or {}).get(f.name)
            rows += _rows(hints[f.name], f"{key}.", sub if isinstance(sub, dict) else None)
            continue
        if defaults is not None and f.name in defaults:
            default = defaults[f.name]
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append(f"| `{key}` | `{_cell(doc.type)}` | `{_cell(_fmt(default))}` | {_allowed(key)} | "
                    f"{_cell(doc.meaning)} |")
    return rows


HEADER = "| key | type | default | allowed | meaning |\n|---|---|---|---|---|"


def _composed(overrides: Sequence[str] = ()) -> dict:
    from omegaconf import OmegaConf

    from moetrain.config.compose import compose_dictconfig

    return OmegaConf.to_container(compose_dictconfig(list(overrides)), resolve=False)


def _group_options() -> dict[str, list[str]]:
    from moetrain.config.compose import config_dir

    root = config_dir()
    return {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in sorted(root.iterdir()) if d.is_dir()}


def render() -> str:
    """The whole of docs/config_reference.md."""
    from moetrain.config.schema import TrainConfig
    from moetrain.moe.routers import ROUTERS

    composed = _composed()
    hints = typing.get_type_hints(TrainConfig)
    out = [
        "# Configuration reference",
        "",
        _prose(f"Generated from the config schemas by `{COMMAND}`: do not edit by hand. docs/configuration.md "
               "explains how the groups compose and how values are checked."),
        "",
        _prose("Every key can be set on the command line (`moetrain-train key=value`). *default* is what "
               "`moetrain-train` runs with no override (configs/train.yaml and its default group options over the "
               "schema); *allowed* is what `moetrain/config/validate.py` accepts on its own (the checks between keys "
               "are in docs/configuration.md); *meaning* is the comment beside the key in the schema."),
        "",
        "## Groups",
        "",
        "| group | options (`group=option`) | default |",
        "|---|---|---|",
    ]
    defaults_list = _defaults_list()
    for group, options in _group_options().items():
        out.append(f"| {group} | {', '.join(options)} | {defaults_list.get(group, '')} |")
    for section in (f.name for f in dataclasses.fields(TrainConfig)):  # model, router, ... in the schema's order
        out += ["", f"## {section}", ""]
        if section == "router":
            out.append(_prose(f"The keys every routing method shares; `router.method` is "
                              f"`{composed['router']['method']}` by default. A method's own keys follow below."))
            out.append("")
        out += [HEADER, *_rows(hints[section], f"{section}.", composed[section])]
    out += ["", "## Routing methods' own keys", "",
            _prose("Each method's `RouterConfig` subclass (moetrain/moe/routers/<method>.py) adds keys, or changes "
                   "a shared key's default, under its presets only. Defaults here are the schema's; a preset may set "
                   "others (below)."),
            ""]
    presets = _router_presets()
    for method in sorted(ROUTERS):
        config_cls = ROUTERS[method].config_cls
        names = [p for p, (m, _) in presets.items() if m == method]
        out += [f"### {method}", "", f"Presets: {', '.join(f'`router={p}`' for p in names) or 'none'}.", ""]
        rows = _rows(config_cls, "router.", None, only_declared=True) if config_cls.__name__ != "RouterConfig" else []
        out += [HEADER, *rows] if rows else ["No keys of its own: the shared router keys above."]
        out.append("")
    out += ["## Router presets", "",
            _prose("What `router=<preset>` (configs/router/<preset>.yaml) sets: its method and every router value "
                   "that differs from `router=default`."), "",
            "| preset | method | values |", "|---|---|---|"]
    base = composed["router"]
    for preset, (method, values) in presets.items():
        changed = ", ".join(f"`{k}={_fmt(v)}`" for k, v in values.items()
                            if k != "method" and base.get(k, object()) != v)
        out.append(f"| {preset} | {method} | {_cell(changed) or '(the defaults)'} |")
    return "\n".join(out) + "\n"


def _prose(text: str) -> str:
    return textwrap.fill(text, width=120, break_long_words=False, break_on_hyphens=False)


def _defaults_list() -> dict[str, str]:
    """{group: default option} from configs/train.yaml's defaults list."""
    from omegaconf import OmegaConf

    from moetrain.config.compose import config_dir

    chosen = {}
    for item in OmegaConf.to_container(OmegaConf.load(config_dir() / "train.yaml")).get("defaults", []):
        if isinstance(item, dict):
            chosen.update({str(k): str(v) for k, v in item.items()})
    return chosen


def _router_presets() -> dict[str, tuple[str, dict]]:
    """{preset: (method, composed router values)} for every configs/router/*.yaml."""
    presets = {}
    for preset in _group_options()["router"]:
        router = _composed([f"router={preset}"])["router"]
        presets[preset] = (router["method"], router)
    return presets


def reference_path() -> Path:
    """docs/config_reference.md of this checkout."""
    return Path(__file__).resolve().parents[2] / "docs" / "config_reference.md"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moetrain.config.reference", description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help=f"write {reference_path()} instead of printing")
    args = p.parse_args(argv)
    text = render()
    if args.write:
        reference_path().write_text(text, encoding="utf-8")
        print(f"wrote {reference_path()}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

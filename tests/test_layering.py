"""The package's dependencies point one way: the MoE layer and the model know nothing of parallelism.

`moetrain/moe` and `moetrain/model` may not import `moetrain.parallel` (nor `moetrain.train`), at module level or
inside a function: parallel layouts hand the layer its dispatcher and experts (moetrain.parallel.moe_layer).
"""

import ast
from pathlib import Path

import moetrain

PACKAGE = Path(moetrain.__file__).parent
FORBIDDEN = {"moe": ("moetrain.parallel", "moetrain.train"), "model": ("moetrain.parallel", "moetrain.train")}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_moe_and_model_do_not_import_parallel():
    offenders = []
    for package, forbidden in FORBIDDEN.items():
        files = sorted((PACKAGE / package).rglob("*.py"))
        assert files, package
        for path in files:
            for name in imported_modules(path):
                if name.startswith(forbidden):
                    offenders.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_the_check_sees_function_level_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from moetrain.parallel.fssdp import state\n")
    assert "moetrain.parallel.fssdp" in imported_modules(probe)

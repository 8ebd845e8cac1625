"""docs/config_reference.md is what `python -m moetrain.config.reference` generates from the schemas (a stale file
fails with the command that regenerates it), lists every key, and reads each meaning from the comment beside it."""

import dataclasses
import re
from typing import Optional

import pytest

from moetrain.config.reference import COMMAND, field_docs, reference_path, render


@pytest.fixture(scope="module")
def generated() -> str:
    return render()


def test_committed_reference_is_current(generated):
    path = reference_path()
    committed = path.read_text(encoding="utf-8") if path.is_file() else ""
    if committed != generated:
        pytest.fail(f"{path.name} is stale (a schema key, comment, default or preset changed); regenerate it with "
                    f"`{COMMAND}` and commit it")


def test_every_key_is_listed(generated):
    import typing

    from moetrain.config.schema import TrainConfig
    from moetrain.config.validate import schema_keys

    listed = set(re.findall(r"^\| `([a-z0-9_.]+)` \|", generated, flags=re.M))
    assert set(typing.get_type_hints(TrainConfig)) <= set(re.findall(r"^## ([a-z_]+)$", generated, flags=re.M))
    leaves = [key for key in schema_keys() if not any(k.startswith(key + ".") for k in schema_keys())]
    missing = [key for key in leaves if key not in listed]
    assert not missing, missing
    assert "parallel.fssdp.budget" in listed and "router.threshold" in listed  # nested, and a method's own key


def test_defaults_are_those_moetrain_train_runs_with(generated):
    # configs/train.yaml sets trainer.checkpoint_every=100 over the schema's 0; interpolations stay as written
    assert "| `trainer.checkpoint_every` | `int` | `100` |" in generated
    assert "| `trainer.run_dir` | `str` | `runs/${model.name}` |" in generated
    assert re.search(r"^\| `parallel.mode` \| `str` \| `ep` \| `ep` \\\| `fssdp` \| ", generated, flags=re.M)
    olmoe = next(line for line in generated.splitlines() if line.startswith("| olmoe | topk |"))
    assert "`top_k=8`" in olmoe and "`z_loss_coeff=0.001`" in olmoe


@dataclasses.dataclass
class _Example:
    plain: int = 1
    commented: float = 2.0  # the meaning
    wrapped: str = "a"  # first line of a meaning
                        # that goes on here
    # a heading for the next fields, not part of any meaning
    after_heading: Optional[int] = None  # its own meaning
    #                                      and its continuation, with the hash at the field's indentation
    last: bool = True


def test_field_docs_reads_comments_beside_fields():
    docs = field_docs(_Example)
    assert list(docs) == ["plain", "commented", "wrapped", "after_heading", "last"]
    assert docs["plain"].meaning == "" and docs["plain"].type == "int"
    assert docs["commented"].meaning == "the meaning"
    assert docs["wrapped"].meaning == "first line of a meaning that goes on here"
    assert docs["after_heading"].type == "Optional[int]"
    assert docs["after_heading"].meaning == ("its own meaning and its continuation, with the hash at the field's "
                                             "indentation")
    assert docs["last"].meaning == ""

"""`tokens_per_s` and `step_time_s` average over the steps since the previous log line, validation time excluded.

A fake clock replaces the trainer's wall clock: each train_step advances it by a known, step-dependent amount and each
validation by a large one, so the expected figures are exact (no timing thresholds)."""

import pytest

from moetrain.cli import train_main
from moetrain.train import trainer as trainer_mod
from tests.train_utils import SMALL, overrides, read_metrics

TOKENS_PER_STEP = 8 * 32  # data.global_batch_size * data.seq_len of tests/train_utils.SMALL
assert "data.global_batch_size=8" in SMALL and "data.seq_len=32" in SMALL


def step_seconds(step: int) -> float:
    """The fake duration of the step that completes `step` (uneven, so one step's time differs from the mean)."""
    return 0.25 * (1 + step % 3) + 0.01 * step


def test_tokens_per_s_is_the_mean_since_the_previous_log_line(tmp_path, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(trainer_mod, "_clock", lambda: now[0])
    train_step, evaluate = trainer_mod.Trainer.train_step, trainer_mod.Trainer.evaluate

    def timed_train_step(self):
        out = train_step(self)  # self.step is now the completed step
        now[0] += step_seconds(self.step)
        return out

    def slow_evaluate(self):
        out = evaluate(self)
        now[0] += 500.0  # validation: must not count as training time
        return out

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", timed_train_step)
    monkeypatch.setattr(trainer_mod.Trainer, "evaluate", slow_evaluate)
    run = tmp_path / "run"
    args = overrides(run, tmp_path / "cache", "trainer.max_steps=15", "trainer.log_every=5", "trainer.eval_every=5")
    assert train_main(args) == 0
    rows = {r["step"]: r for r in read_metrics(run) if "tokens_per_s" in r}
    assert sorted(rows) == [5, 10, 15]
    for step, row in rows.items():
        window = [step_seconds(s) for s in range(step - 4, step + 1)]
        assert row["tokens_per_s"] == pytest.approx(5 * TOKENS_PER_STEP / sum(window), rel=1e-12)
        assert row["step_time_s"] == pytest.approx(sum(window) / 5, rel=1e-12)
        assert row["tokens_per_s"] != pytest.approx(TOKENS_PER_STEP / window[-1], rel=1e-3)  # not the last step's

"""The adaptive pipelining degree tuner: trial schedule, consistent choice across ranks, re-tuning."""

import torch
import torch.distributed as dist

from moetrain.parallel.pipeline import DegreeTuner
from tests.distributed import run_distributed


def _drive(tuner, times_by_degree, steps, load=None):
    seen = []
    for _ in range(steps):
        seen.append(tuner.degree)
        tuner.record(times_by_degree[tuner.degree], num_tokens=64)
        tuner.end_step(load)
    return seen


def test_trials_each_candidate_then_picks_the_fastest():
    tuner = DegreeTuner(max_degree=4, group=None, trial_steps=2)
    assert tuner.candidates == [1, 2, 4]
    seen = _drive(tuner, {1: 3.0, 2: 1.0, 4: 2.0}, steps=9)
    assert seen == [1, 1, 2, 2, 4, 4, 2, 2, 2]
    assert tuner.chosen == 2 and tuner.decisions == 1


def test_max_degree_limits_candidates():
    assert DegreeTuner(max_degree=1, group=None).candidates == [1]
    assert DegreeTuner(max_degree=8, group=None).candidates == [1, 2, 4, 8]


def test_retunes_on_load_drift_and_shape_change():
    tuner = DegreeTuner(max_degree=2, group=None, trial_steps=1, retune_drift=0.25)
    _drive(tuner, {1: 2.0, 2: 1.0}, steps=2, load=torch.tensor([1.0, 1.0, 1.0, 1.0]))
    assert tuner.chosen == 2
    tuner.end_step(torch.tensor([1.1, 0.9, 1.0, 1.0]))  # small drift: keep
    assert tuner.chosen == 2
    tuner.end_step(torch.tensor([10.0, 0.0, 0.0, 0.0]))  # TV distance 0.75: re-tune
    assert tuner.chosen is None and tuner.degree == 1
    _drive(tuner, {1: 1.0, 2: 2.0}, steps=2, load=torch.tensor([10.0, 0.0, 0.0, 0.0]))
    assert tuner.chosen == 1 and tuner.decisions == 2
    tuner.record(1.0, num_tokens=128)  # the micro-batch shape changed
    tuner.end_step()
    assert tuner.chosen is None


def _consistent_body(rank, world):
    tuner = DegreeTuner(max_degree=2, group=dist.group.WORLD, trial_steps=1)
    # Rank 0 finds degree 2 faster, rank 1 finds it much slower: the slowest rank decides, for everyone.
    times = {0: {1: 2.0, 2: 1.0}, 1: {1: 2.1, 2: 5.0}}[rank]
    _drive(tuner, times, steps=2)
    return tuner.chosen


def test_choice_is_the_same_on_every_rank():
    assert run_distributed(_consistent_body, 2) == [1, 1]

"""Capacity mode couples the sequences of a batch; dropless mode does not.

With `router.capacity_factor` set, each expert keeps at most `capacity = ceil(T*K/E * factor)` routed copies of the T
tokens of a forward, the ones with the highest gates. A sequence whose tokens route to an expert with gates near 1
therefore evicts the copies of *other* sequences in the same batch (Hayes et al. 2024, "Buffer Overflow in Mixture of
Experts", arXiv 2402.05526). These tests build that attack against one MoELayer and check that dropless mode
(`capacity_factor=null`, the default) keeps a sequence's output independent of what it is batched with.
See docs/load_balancing.md, "Capacity".
"""

import pytest
import torch

from moetrain.config.compose import compose_config
from moetrain.config.schema import RouterConfig
from moetrain.model.transformer import TransformerLM
from moetrain.moe.layer import MoELayer
from moetrain.moe.plan import build_plan
from tests.train_utils import SMALL

D, F, E, K, S = 32, 64, 8, 2, 128  # model dim, expert hidden, experts, top-k, tokens per sequence


def make_layer(capacity_factor):
    torch.manual_seed(0)
    layer = MoELayer(D, F, E, 0, RouterConfig(top_k=K, capacity_factor=capacity_factor), layer_id=0)
    layer.reset_parameters(0.2, 0.2, seed=0)
    return layer


def sequences():
    """(victim_1SD, benign_1SD): two ordinary sequences."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, S, D, generator=g), torch.randn(1, S, D, generator=g)


@torch.no_grad()
def target_expert(layer, victim_1SD) -> int:
    """The expert the victim's tokens pick first most often."""
    topk_idx_TK = layer.router(victim_1SD.view(-1, D)).topk_idx_TK
    return int(torch.bincount(topk_idx_TK[:, 0], minlength=E).argmax())


@torch.no_grad()
def adversary_for(layer, expert: int):
    """A sequence whose every token routes to `expert` with a gate of ~1: a large multiple of that expert's router
    row, so its softmax score saturates and its copies outrank every ordinary token's at the capacity cut."""
    return (50.0 * layer.router.gate.weight[expert]).expand(1, S, D).clone()


@torch.no_grad()
def victim_output(layer, victim_1SD, *others_1SD):
    """The layer's output for the victim's tokens (S, D) when batched (first) with `others`."""
    return layer(torch.cat([victim_1SD, *others_1SD]))[0]


def relative_change(new_SD, old_SD):
    return (new_SD - old_SD).norm(dim=-1) / old_SD.norm(dim=-1).clamp_min(1e-12)


@pytest.mark.parametrize("capacity_factor", [1.0, 1.25, 2.0])
def test_adversarial_sequence_evicts_victim_tokens_in_capacity_mode(capacity_factor):
    layer = make_layer(capacity_factor)
    victim, benign = sequences()
    expert = target_expert(layer, victim)
    adversary = adversary_for(layer, expert)
    baseline_SD = victim_output(layer, victim, benign)  # same batch size, so the same capacity
    attacked_SD = victim_output(layer, victim, adversary)
    assert layer(torch.cat([victim, adversary]), return_record=True)[1].num_dropped > 0

    change_S = relative_change(attacked_SD, baseline_SD)
    assert int((change_S > 0.5).sum()) >= S // 8, f"{int((change_S > 0.5).sum())} of {S} victim tokens changed by > 50%"
    # the mechanism: the adversary's gates of ~1 fill the attacked expert, so no victim copy sent there survives
    with torch.no_grad():
        routed = layer.router(torch.cat([victim, adversary]).view(-1, D))
    plan = build_plan(routed.topk_idx_TK, routed.gates_TK, E, capacity_factor)
    kept_copy_R = plan.copy_idx_R
    kept_victim_R = kept_copy_R[kept_copy_R // K < S]
    sent_to_target = int((routed.topk_idx_TK[:S] == expert).sum())
    assert sent_to_target > 0
    assert not bool((routed.topk_idx_TK.flatten()[kept_victim_R] == expert).any())


def test_capacity_mode_output_depends_on_the_batch_even_without_an_attacker():
    layer = make_layer(1.0)
    victim, benign = sequences()
    alone_SD = victim_output(layer, victim)
    batched_SD = victim_output(layer, victim, benign)
    assert (relative_change(batched_SD, alone_SD) > 1e-3).any()


def test_dropless_layer_output_is_batch_independent():
    layer = make_layer(None)
    victim, benign = sequences()
    adversary = adversary_for(layer, target_expert(layer, victim))
    alone_SD = victim_output(layer, victim)
    torch.testing.assert_close(victim_output(layer, victim, benign), alone_SD)
    torch.testing.assert_close(victim_output(layer, victim, adversary), alone_SD)
    torch.testing.assert_close(victim_output(layer, victim, adversary, adversary, benign), alone_SD)
    assert layer(torch.cat([victim, adversary, adversary, benign]), return_record=True)[1].num_dropped == 0


@torch.no_grad()
def test_dropless_model_logits_are_batch_independent():
    cfg = compose_config(SMALL)  # dropless (router.capacity_factor=null), 2 MoE layers
    model = TransformerLM(cfg.model, cfg.router)
    model.init_weights(0)
    g = torch.Generator().manual_seed(2)
    victim_1S = torch.randint(0, 256, (1, 32), generator=g)
    others_3S = torch.cat([torch.randint(0, 256, (2, 32), generator=g), torch.full((1, 32), 7)])
    alone_1SV = model(victim_1S)
    batched_1SV = model(torch.cat([victim_1S, others_3S]))[:1]
    torch.testing.assert_close(batched_1SV, alone_1SV)

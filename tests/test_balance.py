"""Balance losses and the aux-loss-free bias controller against hand-computed values.

Legend: T tokens, E experts, K top-k, B batch, S sequence.
"""

import math

import pytest
import torch

from moetrain.balance.bias import BIAS_UPDATE_RULES, bias_rate_at, bias_update_
from moetrain.balance.controller import BalanceController
from moetrain.config.schema import RouterConfig
from moetrain.config.validate import CHOICES
from moetrain.parallel.mesh import ParallelContext
from moetrain.parallel.moe_layer import build_moe_layer
from moetrain.balance.losses import seq_aux_loss, switch_aux_loss, z_loss


# ---- bias controller ---------------------------------------------------------------------------------------------


def test_bias_update_ties_and_unused_expert():
    bias_E = torch.tensor([0.5, 0.0, 0.0, -0.5])
    counts_E = torch.tensor([6.0, 2.0, 0.0, 0.0])  # mean 2: overloaded, tie with the mean, unused, unused
    update_E = bias_update_(bias_E, counts_E, rate=0.1, rule="sign")
    torch.testing.assert_close(update_E, torch.tensor([-0.1, 0.0, 0.1, 0.1]))
    torch.testing.assert_close(bias_E, torch.tensor([0.4, 0.0, 0.1, -0.4]))
    assert bias_E.dtype == torch.float32 and not bias_E.requires_grad


def test_bias_update_centered():
    bias_E = torch.zeros(4)
    update_E = bias_update_(bias_E, torch.tensor([6, 2, 0, 0]), rate=0.1, center=True, rule="sign")
    # raw [-0.1, 0, 0.1, 0.1], mean 0.025
    expected_E = torch.tensor([-0.125, -0.025, 0.075, 0.075])
    torch.testing.assert_close(update_E, expected_E)
    torch.testing.assert_close(bias_E, expected_E)
    assert abs(float(bias_E.sum())) < 1e-7


def test_bias_update_balanced_and_all_unused_do_nothing():
    bias_E = torch.tensor([0.1, 0.2, 0.3])
    bias_update_(bias_E, torch.tensor([5, 5, 5]), rate=1.0, rule="sign")
    bias_update_(bias_E, torch.zeros(3), rate=1.0, rule="sign")
    torch.testing.assert_close(bias_E, torch.tensor([0.1, 0.2, 0.3]))


def test_bias_update_errors():
    with pytest.raises(TypeError, match="fp32"):
        bias_update_(torch.zeros(2, dtype=torch.bfloat16), torch.ones(2), 0.1)
    with pytest.raises(ValueError, match="match"):
        bias_update_(torch.zeros(2), torch.ones(3), 0.1)


def test_bias_update_sign_rule_unchanged():
    """DeepSeek-V3's rule (router.bias_update_rule=sign): every expert off the mean moves by exactly the rate."""
    # the size of the violation does not matter to the sign rule
    bias_E = torch.zeros(3)
    update_E = bias_update_(bias_E, torch.tensor([100.0, 1.0, 0.0]), rate=0.1, rule="sign")
    torch.testing.assert_close(update_E, torch.tensor([-0.1, 0.1, 0.1]))


def test_bias_update_proportional_hand_computed():
    bias_E = torch.tensor([0.5, 0.0, 0.0, -0.5])
    counts_E = torch.tensor([6.0, 2.0, 0.0, 0.0])  # mean 2: (mean - c) / mean = [-2, 0, 1, 1]
    update_E = bias_update_(bias_E, counts_E, rate=0.1, rule="proportional")
    torch.testing.assert_close(update_E, torch.tensor([-0.2, 0.0, 0.1, 0.1]))
    torch.testing.assert_close(bias_E, torch.tensor([0.3, 0.0, 0.1, -0.4]))
    assert bias_E.dtype == torch.float32
    # the update already has zero mean: centering changes nothing
    centered_E = bias_update_(torch.zeros(4), counts_E, rate=0.1, center=True, rule="proportional")
    torch.testing.assert_close(centered_E, update_E)
    # a small violation gives a small step (the sign rule would move every expert by the full rate)
    small_E = bias_update_(torch.zeros(4), torch.tensor([101.0, 99.0, 100.0, 100.0]), 0.1, rule="proportional")
    torch.testing.assert_close(small_E, torch.tensor([-0.001, 0.001, 0.0, 0.0]))
    # only the relative loads matter: scaling the counts leaves the step unchanged
    torch.testing.assert_close(bias_update_(torch.zeros(4), counts_E * 1000, 0.1, rule="proportional"), update_E)


def test_bias_update_proportional_balanced_and_all_unused_do_nothing():
    bias_E = torch.tensor([0.1, 0.2, 0.3])
    bias_update_(bias_E, torch.tensor([5, 5, 5]), rate=1.0, rule="proportional")
    bias_update_(bias_E, torch.zeros(3), rate=1.0, rule="proportional")
    torch.testing.assert_close(bias_E, torch.tensor([0.1, 0.2, 0.3]))


def test_bias_update_rules_match_the_config_choices():
    assert set(BIAS_UPDATE_RULES) == set(CHOICES["router.bias_update_rule"])
    assert RouterConfig().bias_update_rule in BIAS_UPDATE_RULES
    assert RouterConfig().bias_update_rule == "proportional" and RouterConfig().bias_update_rate == 0.05
    with pytest.raises(ValueError, match="rule"):
        bias_update_(torch.zeros(2), torch.ones(2), 0.1, rule="bogus")


def _skewed_layer(rule: str, rate: float):
    torch.manual_seed(0)
    E = 4
    cfg = RouterConfig(top_k=1, bias_update_rule=rule, bias_update_rate=rate)
    layer = build_moe_layer(8, 16, E, 0, cfg, layer_id=1)
    layer.reset_parameters(0.3, 0.3, seed=0)
    layer.router.expert_bias_E.copy_(torch.tensor([0.6, 0.0, 0.0, -0.6]))  # start far from balance
    return layer, cfg


def _max_vio(counts_E: torch.Tensor) -> float:
    return float((counts_E.max() - counts_E.mean()) / counts_E.mean())


def test_controller_proportional_update_moves_bias_towards_balance():
    layer, cfg = _skewed_layer("proportional", 0.05)
    controller = BalanceController(layer, cfg, max_steps=100, ctx=ParallelContext())
    x_BSD = torch.randn(1, 256, 8, generator=torch.Generator().manual_seed(1))
    vios, biases = [], []
    for step in range(60):
        with torch.no_grad():
            _, record = layer(x_BSD, return_record=True)
        controller.observe([record])
        bias_before_E = layer.router.expert_bias_E.clone()
        counts_E = controller.step(step)[0]
        update_E = layer.router.expert_bias_E - bias_before_E
        if step == 0:  # the first step is exactly the proportional formula on the step's counts
            mean = counts_E.mean()
            torch.testing.assert_close(update_E, 0.05 * (mean - counts_E) / mean)
        vios.append(_max_vio(counts_E))
        biases.append(layer.router.expert_bias_E.clone())
    assert vios[0] > 1.0  # the forced bias makes expert 0 take most tokens
    assert max(vios[-10:]) < 0.2 * vios[0]
    # it settles: the late steps move the bias far less than the early ones
    early = float((biases[5] - biases[0]).abs().max())
    late = float((biases[-1] - biases[-6]).abs().max())
    assert late < 0.2 * early
    # the favoured expert lost bias, the disfavoured one gained
    assert biases[-1][0] < 0.6 and biases[-1][3] > -0.6


def test_controller_leaves_bias_on_a_skipped_step():
    layer, cfg = _skewed_layer("proportional", 0.05)
    controller = BalanceController(layer, cfg, max_steps=100, ctx=ParallelContext())
    before_E = layer.router.expert_bias_E.clone()
    with torch.no_grad():
        _, record = layer(torch.randn(1, 64, 8), return_record=True)
    controller.observe([record])
    controller.step(0, update_bias=False)
    torch.testing.assert_close(layer.router.expert_bias_E, before_E)


def test_bias_rate_schedule():
    assert bias_rate_at(0, 100, 1e-3, 0.8) == 1e-3
    assert bias_rate_at(79, 100, 1e-3, 0.8) == 1e-3
    assert bias_rate_at(80, 100, 1e-3, 0.8) == 0.0
    assert bias_rate_at(99, 100, 1e-3, 1.0) == 1e-3
    assert bias_rate_at(0, 100, 1e-3, 0.0) == 0.0


# ---- losses -----------------------------------------------------------------------------------------------------


def test_switch_aux_loss_hand_computed():
    scores_TE = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    topk_idx_TK = torch.tensor([[0, 1], [1, 2]])
    # f = [1, 2, 1] / 4, P = [0.3, 0.45, 0.25]; sum f P = 0.3625
    loss = switch_aux_loss(scores_TE, topk_idx_TK, num_experts=3, coeff=0.01)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, torch.tensor(0.01 * 3 * 0.3625))


def test_switch_aux_loss_balanced_equals_coeff():
    E, K, T = 4, 2, 8
    scores_TE = torch.full((T, E), 1.0 / E)
    topk_idx_TK = (torch.arange(T * K) % E).view(T, K)
    torch.testing.assert_close(switch_aux_loss(scores_TE, topk_idx_TK, E, 0.1), torch.tensor(0.1))


def test_switch_aux_loss_sigmoid_scores_are_normalised():
    raw_TE = torch.tensor([[1.0, 0.6, 0.4], [0.2, 1.2, 0.6]])  # rows sum to 2: normalised = hand case above
    topk_idx_TK = torch.tensor([[0, 1], [1, 2]])
    torch.testing.assert_close(switch_aux_loss(raw_TE, topk_idx_TK, 3, 1.0), torch.tensor(3 * 0.3625))


def test_switch_aux_loss_gradient_only_through_P():
    torch.manual_seed(0)
    T, E, K = 6, 4, 2
    logits_TE = torch.randn(T, E, requires_grad=True)
    scores_TE = torch.softmax(logits_TE, -1)
    topk_idx_TK = scores_TE.detach().topk(K, -1).indices
    switch_aux_loss(scores_TE, topk_idx_TK, E, 0.5).backward()
    grad = logits_TE.grad.clone()

    # reference: f is a constant, only P = mean softmax carries the gradient
    logits2_TE = logits_TE.detach().clone().requires_grad_(True)
    f_E = torch.bincount(topk_idx_TK.flatten(), minlength=E).float() / (T * K)
    (0.5 * E * (f_E * torch.softmax(logits2_TE, -1).mean(0)).sum()).backward()
    torch.testing.assert_close(grad, logits2_TE.grad)

    # d loss / d s_{t,i} for scores summing to one, through the normalisation: coeff*E/T * (f_i - sum_j f_j s'_j)
    s_TE = torch.softmax(torch.randn(T, E), -1).requires_grad_(True)
    switch_aux_loss(s_TE, topk_idx_TK, E, 0.5).backward()
    expected_TE = 0.5 * E / T * (f_E - (f_E * s_TE.detach()).sum(-1, keepdim=True))
    torch.testing.assert_close(s_TE.grad, expected_TE)


def test_switch_aux_loss_global_counts_match_single_process():
    torch.manual_seed(1)
    T, E, K = 10, 5, 2
    scores_TE = torch.softmax(torch.randn(T, E), -1)
    topk_idx_TK = scores_TE.topk(K, -1).indices
    full = switch_aux_loss(scores_TE, topk_idx_TK, E, 0.1)
    global_counts_E = torch.bincount(topk_idx_TK.flatten(), minlength=E)  # "all-reduced" over the 2 ranks
    per_rank = [
        switch_aux_loss(scores_TE[r * 5 : (r + 1) * 5], topk_idx_TK[r * 5 : (r + 1) * 5], E, 0.1, global_counts_E)
        for r in range(2)
    ]
    torch.testing.assert_close((per_rank[0] + per_rank[1]) / 2, full)
    # without the global counts the average is (in general) different
    local = [switch_aux_loss(scores_TE[r * 5 : (r + 1) * 5], topk_idx_TK[r * 5 : (r + 1) * 5], E, 0.1) for r in (0, 1)]
    assert not torch.allclose((local[0] + local[1]) / 2, full)


def test_switch_aux_loss_empty_and_errors():
    scores_TE = torch.zeros(0, 4, requires_grad=True)
    loss = switch_aux_loss(scores_TE, torch.zeros(0, 2, dtype=torch.long), 4, 0.1)
    assert float(loss.detach()) == 0.0
    loss.backward()
    with pytest.raises(ValueError, match="outside"):
        switch_aux_loss(torch.ones(2, 4), torch.tensor([[0], [4]]), 4, 0.1)


def test_seq_aux_loss_hand_computed():
    scores_BSE = torch.tensor([[[0.7, 0.3], [0.4, 0.6]], [[0.5, 0.5], [0.5, 0.5]]])
    topk_idx_BSK = torch.tensor([[[0], [0]], [[0], [1]]])
    # seq 0: f = 2/(1*2) * [2, 0] = [2, 0], P = [0.55, 0.45] -> 1.1
    # seq 1: f = [1, 1], P = [0.5, 0.5] -> 1.0
    loss = seq_aux_loss(scores_BSE, topk_idx_BSK, num_experts=2, coeff=0.1)
    torch.testing.assert_close(loss, torch.tensor(0.1 * 1.05))
    # sigmoid-style unnormalised scores give the same loss after per-token normalisation
    torch.testing.assert_close(seq_aux_loss(scores_BSE * 3.0, topk_idx_BSK, 2, 0.1), loss)


def test_seq_aux_loss_gradient_flows_to_scores():
    scores_BSE = torch.softmax(torch.randn(2, 4, 3), -1).requires_grad_(True)
    topk_idx_BSK = scores_BSE.detach().topk(2, -1).indices
    seq_aux_loss(scores_BSE, topk_idx_BSK, 3, 1.0).backward()
    assert scores_BSE.grad is not None and torch.isfinite(scores_BSE.grad).all()


def test_z_loss_hand_computed():
    logits_TE = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp = ln 2, ln 4 = 2 ln 2 -> mean of squares = 2.5 ln(2)^2
    torch.testing.assert_close(z_loss(logits_TE, 1e-3), torch.tensor(1e-3 * 2.5 * math.log(2.0) ** 2))
    logits_TE.requires_grad_(True)
    z_loss(logits_TE, 1.0).backward()
    assert logits_TE.grad.abs().sum() > 0

"""AdaMoE routing (router=adamoe): null experts among the choices, a variable number of true experts per token (0 to
k), gates renormalised over the true experts, the load-balancing loss with the null experts as one pool.

Legend: T tokens, D model dim, E true experts, M null experts, X = E + M choices, K top-k over the X choices.
Under expert parallelism and FSSDP against one process (layer and 20-step run): tests/test_routing_methods.py.
"""

import math

import pytest
import torch

from moetrain.config.compose import compose_config
from moetrain.config.schema import ModelConfig
from moetrain.config.validate import ConfigError, validate
from moetrain.model.transformer import count_parameters
from moetrain.moe.layer import MoELayer
from moetrain.moe.routers import RouteContext
from moetrain.moe.routers.adamoe import AdaMoEConfig, AdaMoERouter, null_pool_aux_loss
from tests.distributed import run_distributed
from tests.moe_reference import check_layer_against_dense_reference

E, M, K = 3, 3, 3
X = E + M


def identity_router(**cfg) -> AdaMoERouter:
    """A router over D = X features whose logits are the features themselves (gate = identity)."""
    router = AdaMoERouter(X, E, AdaMoEConfig(**{"top_k": K, "num_null_experts": M, **cfg}))
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(X))
    return router


def by_hand(scores, k, e, bias=None, norm=True):
    """Plain-Python AdaMoE selection of one token: (choices best first, ties to the lower id; true-expert gates)."""
    biased = [s + (bias[i] if bias is not None and i < e else 0.0) for i, s in enumerate(scores)]
    chosen = sorted(range(len(scores)), key=lambda i: (-biased[i], i))[:k]
    true_sum = sum(scores[i] for i in chosen if i < e)
    gates = [(scores[i] / true_sum if norm else scores[i]) if i < e else 0.0 for i in chosen]
    return chosen, gates


# Logits per token (true experts 0..2, null experts 3..5):
LOGITS = torch.tensor([
    [3.0, 2.0, 1.0, -1.0, -2.0, -3.0],   # three true experts
    [3.0, -2.0, -1.0, 2.0, 1.0, -3.0],   # true 0, then nulls 3 and 4: one true expert
    [-3.0, -2.0, -1.0, 1.0, 2.0, 3.0],   # only null experts: no true expert at all
    [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],      # all tied: the lower ids win, i.e. the true experts
    [0.5, 2.0, -1.0, 2.0, 0.0, 0.0],     # tie between true 1 and null 3: true 1 first; then true 0
])


def test_selection_and_gates_against_a_hand_computation():
    router = identity_router()
    out = router(LOGITS)
    scores = torch.softmax(LOGITS, -1)
    torch.testing.assert_close(out.scores_TE, scores)
    assert out.topk_idx_TK.shape == (5, K) and out.keep_TK.shape == (5, K)
    assert int(out.topk_idx_TK.min()) >= 0 and int(out.topk_idx_TK.max()) < E  # valid ids, null copies included
    for t in range(5):
        chosen, gates = by_hand(scores[t].tolist(), K, E)
        assert out.keep_TK[t].tolist() == [c < E for c in chosen], t
        kept = out.keep_TK[t]
        assert out.topk_idx_TK[t][kept].tolist() == [c for c in chosen if c < E], t
        torch.testing.assert_close(out.gates_TK[t], torch.tensor(gates), msg=f"token {t}")
    assert out.keep_TK.sum(1).tolist() == [3, 1, 0, 3, 2]  # 0 to K true experts per token
    assert out.topk_idx_TK[4][out.keep_TK[4]].tolist() == [1, 0] and out.keep_TK[4].tolist() == [True, False, True]
    assert torch.all(out.gates_TK[2] == 0)  # no true expert: no output at all
    torch.testing.assert_close(out.gates_TK.sum(1), torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0]))  # renormalised
    counts = torch.bincount(out.topk_idx_TK[out.keep_TK], minlength=E).float()
    torch.testing.assert_close(out.tokens_per_expert_E, counts)
    assert out.stats["counts_X"].tolist() == torch.bincount(
        torch.tensor([c for t in range(5) for c in by_hand(scores[t].tolist(), K, E)[0]]), minlength=X).tolist()


def test_without_renormalisation_the_gates_are_the_probabilities():
    out = identity_router(norm_topk_prob=False, route_scale=2.0)(LOGITS)
    scores = torch.softmax(LOGITS, -1)
    for t in range(5):
        chosen, gates = by_hand(scores[t].tolist(), K, E, norm=False)
        torch.testing.assert_close(out.gates_TK[t], 2.0 * torch.tensor(gates))


def test_the_bias_moves_only_true_experts_and_never_a_gate():
    router = identity_router()
    bias = [0.0, 0.0, 0.5]
    router.expert_bias_E.copy_(torch.tensor(bias))
    out = router(LOGITS)
    scores = torch.softmax(LOGITS, -1)
    for t in range(5):
        chosen, gates = by_hand(scores[t].tolist(), K, E, bias=bias)
        assert out.keep_TK[t].tolist() == [c < E for c in chosen], t
        torch.testing.assert_close(out.gates_TK[t], torch.tensor(gates))
    assert out.keep_TK[2].tolist() == [False, True, False]  # expert 2 now beats null 4 (bias), not null 5


def test_layer_output_equals_the_dense_reference_with_the_keep_mask():
    torch.manual_seed(0)
    cfg = compose_config(["router=adamoe", "model.num_experts=4", "router.top_k=3", "router.num_null_experts=4"])
    layer = MoELayer(8, 16, 4, 0, cfg.router, layer_id=0)
    layer.reset_parameters(0.5, 0.3, seed=0)
    y, record, routed = check_layer_against_dense_reference(layer)
    per_token = routed.keep_TK.sum(1)
    assert (per_token == 0).any() and (per_token == 1).any() and (per_token > 1).any()
    assert torch.all(y[per_token == 0] == 0)
    torch.testing.assert_close(record.tokens_per_expert_E, routed.tokens_per_expert_E)


def test_load_balancing_loss_against_a_hand_computation():
    router = identity_router(aux_loss_coeff=0.1, z_loss_coeff=0.01)
    logits = LOGITS.clone().requires_grad_()
    out = router(logits)
    terms = router.losses(out, RouteContext((1, 5)))
    assert sorted(terms) == ["aux", "z"]
    scores = torch.softmax(LOGITS, -1).tolist()
    counts = [0.0] * X
    for t in range(5):
        for c in by_hand(scores[t], K, E)[0]:
            counts[c] += 1
    f = [c / (5 * K) for c in counts]
    null_f = sum(f[E:]) / M
    f = f[:E] + [null_f] * M
    P = [sum(scores[t][x] for t in range(5)) / 5 for x in range(X)]
    expected = 0.1 * X * sum(fi * pi for fi, pi in zip(f, P))
    assert terms["aux"].item() == pytest.approx(expected, rel=1e-6)
    # the null experts really are one pool: moving copies between null experts does not change the loss
    counts_X = out.stats["counts_X"].clone()
    moved = counts_X.clone()
    moved[E:] = torch.tensor([counts_X[E:].sum(), 0.0, 0.0])
    assert null_pool_aux_loss(out.scores_TE, moved, E, 0.1).item() == pytest.approx(expected, rel=1e-6)
    # the gradient reaches the scores through P only (f is a constant)
    terms["aux"].backward()
    same = LOGITS.clone().requires_grad_()
    (0.1 * X * (torch.tensor(f) * torch.softmax(same, -1).mean(0)).sum()).backward()
    torch.testing.assert_close(logits.grad, same.grad)
    expected_z = 0.01 * torch.logsumexp(LOGITS, -1).square().mean()
    torch.testing.assert_close(terms["z"], expected_z)


def test_balanced_choices_give_the_loss_its_coefficient():
    """Uniform scores and equal counts over the X choices: aux = coeff (like the Switch loss)."""
    scores = torch.full((4, X), 1.0 / X)
    assert float(null_pool_aux_loss(scores, torch.full((X,), 2.0), E, 0.01)) == pytest.approx(0.01)


def _two_rank_loss(rank, world):
    import torch.distributed as dist

    router = identity_router(aux_loss_coeff=0.1)
    mine = LOGITS[[0, 1, 2]] if rank == 0 else LOGITS[[3, 4, 0]]
    out = router(mine)
    return router.losses(out, RouteContext((1, 3), dp_group=dist.group.WORLD))["aux"].item()


def test_counts_are_global_over_the_data_parallel_ranks():
    """Each rank's loss uses the global f (null choices included): the ranks' mean is the one-process loss."""
    per_rank = run_distributed(_two_rank_loss, 2)
    router = identity_router(aux_loss_coeff=0.1)
    full = router(LOGITS[[0, 1, 2, 3, 4, 0]])
    expected = router.losses(full, RouteContext((1, 6)))["aux"].item()
    assert sum(per_rank) / 2 == pytest.approx(expected, rel=1e-6)


def test_choices_and_active_experts_per_token():
    cfg = compose_config(["router=adamoe", "model.num_experts=8"])
    assert isinstance(cfg.router, AdaMoEConfig) and cfg.router.method == "adamoe"
    assert AdaMoERouter.num_choices(cfg.router, 8) == 16
    assert AdaMoERouter.experts_per_token(cfg.router, 8) == 2.0  # 4 * 8 / 16: the top-2 budget when balanced
    counts = count_parameters(cfg.model, cfg.router)
    expert_params = counts["total"] - count_parameters(cfg.model, compose_config(["model.num_experts=8"]).router)[
        "total"]
    assert expert_params == cfg.model.dim * 8 * (cfg.model.n_layers - cfg.model.first_k_dense)  # 8 null gate rows
    layer = MoELayer(8, 16, 8, 0, cfg.router, layer_id=0)
    assert layer.router.gate.weight.shape == (16, 8)


def problems(*overrides):
    try:
        validate(compose_config(["router=adamoe", *overrides]), world_size=1)
    except ConfigError as e:
        return str(e)
    return None


def test_preset_is_valid():
    assert problems() is None
    assert problems("router.top_k=16") is None  # k may reach E + M
    assert problems("router.top_k=2", "router.num_null_experts=2") is None


@pytest.mark.parametrize("override, message", [
    ("router.num_null_experts=0", "router.num_null_experts=0 must be >= 1 (the zero-output experts of "
                                  "router=adamoe; for plain top-k routing use router=default)"),
    ("router.num_null_experts=-3", "router.num_null_experts=-3 must be >= 1"),
    ("router.top_k=17", "router.top_k=17 must be between 1 and model.num_experts=8 plus the 8 experts of "
                        "router=adamoe"),
    ("router.num_groups=2", "router.num_groups=2: router=adamoe has no group-limited routing; set "
                            "router.num_groups=1"),
    ("router.force_balanced=true", "router.force_balanced=true is a top-k benchmarking mode that router=adamoe "
                                   "does not have"),
])
def test_bad_values_get_one_line_messages(override, message):
    got = problems(override)  # one line per problem: the method's own line names the key, the value and the fix
    assert got is not None and any(message in line for line in got.splitlines()), got


def test_a_misspelled_key_fails_when_composing():
    with pytest.raises(ConfigError, match=r"unknown config key 'router.num_nul_experts'; did you mean "
                                          r"router.num_null_experts\?"):
        compose_config(["router=adamoe", "router.num_nul_experts=1"])
    with pytest.raises(ConfigError, match="router.num_null_experts"):  # the key belongs to the preset only
        compose_config(["router.num_null_experts=1"])


def test_checks_are_silent_for_the_dataclass_defaults():
    assert list(AdaMoERouter.check(AdaMoEConfig(), ModelConfig())) == []
    assert math.isclose(AdaMoERouter.experts_per_token(AdaMoEConfig(top_k=3, num_null_experts=1), 2), 2.0)

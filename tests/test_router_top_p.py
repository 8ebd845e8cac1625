"""Dynamic top-p routing (router=top_p): experts in order of probability until their cumulative probability reaches
the threshold, capped at top_k; the unnormalised probabilities as gates; the routing-entropy (dynamic) loss.

Legend: T tokens, D model dim, E experts, K = top_k (the cap).
Under expert parallelism and FSSDP against one process (layer and 20-step run): tests/test_routing_methods.py.
"""

import math

import pytest
import torch

from moetrain.config.compose import compose_config
from moetrain.config.schema import ModelConfig
from moetrain.config.validate import ConfigError, validate
from moetrain.moe.layer import MoELayer
from moetrain.moe.routers import RouteContext
from moetrain.moe.routers.top_p import TopPConfig, TopPRouter, routing_entropy_loss
from tests.moe_reference import check_layer_against_dense_reference

E = 4


def prob_router(**cfg) -> TopPRouter:
    """A router over D = E features whose logits are the features themselves (gate = identity): feeding log(p) as the
    token gives the probabilities p."""
    router = TopPRouter(E, E, TopPConfig(**{"top_k": E, "threshold": 0.4, "norm_topk_prob": False, **cfg}))
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(E))
    return router


def by_hand(probs, p, k, bias=None):
    """Plain-Python top-p of one token: experts best first (ties to the lower id), kept while the probability of the
    experts above is below p, at most k."""
    key = [q + (bias[i] if bias is not None else 0.0) for i, q in enumerate(probs)]
    order = sorted(range(len(probs)), key=lambda i: (-key[i], i))
    kept, before = [], 0.0
    for i in order[:k]:
        if kept and before >= p:
            break
        kept.append(i)
        before += probs[i]
    return kept


PROBS = torch.tensor([
    [0.70, 0.10, 0.10, 0.10],   # confident: one expert
    [0.05, 0.30, 0.45, 0.20],   # 0.45 >= 0.4 after the first: one expert
    [0.25, 0.25, 0.25, 0.25],   # flat: 0, 0.25 < 0.4, 0.5 >= 0.4 -> two experts, the lower ids (ties)
    [0.12, 0.13, 0.14, 0.61],   # one
    [0.30, 0.05, 0.35, 0.30],   # 0.35, then 0.65: experts 2 and 0 (0 beats 3 on the tie)
    [0.26, 0.26, 0.24, 0.24],   # 0.26, 0.52: two
])


def test_selection_against_a_hand_computation():
    router = prob_router()
    out = router(PROBS.log())
    probs = out.scores_TE
    torch.testing.assert_close(probs, PROBS)
    for t in range(len(PROBS)):
        expected = by_hand(probs[t].tolist(), 0.4, E)
        got = out.topk_idx_TK[t][out.keep_TK[t]].tolist()
        assert got == expected, (t, got, expected)
        torch.testing.assert_close(out.gates_TK[t][out.keep_TK[t]], probs[t][expected])  # not renormalised
        assert torch.all(out.gates_TK[t][~out.keep_TK[t]] == 0)
    assert out.keep_TK.sum(1).tolist() == [1, 1, 2, 1, 2, 2]  # a variable number of experts per token
    assert out.topk_idx_TK[2][:2].tolist() == [0, 1] and out.topk_idx_TK[4][:2].tolist() == [2, 0]
    assert out.keep_TK[:, 0].all()  # the first expert is always kept
    torch.testing.assert_close(out.tokens_per_expert_E, torch.bincount(out.topk_idx_TK[out.keep_TK],
                                                                        minlength=E).float())


@pytest.mark.parametrize("threshold, top_k", [(0.4, 1), (0.6, 4), (0.9, 3), (1.0, 4), (0.05, 4)])
def test_other_thresholds_and_caps(threshold, top_k):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(40, E, generator=g) * 1.5
    out = prob_router(threshold=threshold, top_k=top_k)(logits)
    assert out.topk_idx_TK.shape == (40, top_k)
    for t in range(40):
        expected = by_hand(out.scores_TE[t].tolist(), threshold, top_k)
        assert out.topk_idx_TK[t][out.keep_TK[t]].tolist() == expected, t
    if threshold == 0.05:
        assert out.keep_TK.sum(1).eq(1).all()  # the first expert always reaches a tiny p
    if threshold == 0.9:
        assert out.keep_TK.sum(1).max() == 3  # the cap binds


def test_the_bias_orders_but_never_scales_a_gate():
    bias = [0.5, 0.0, 0.0, 0.0]
    router = prob_router()
    router.expert_bias_E.copy_(torch.tensor(bias))
    out = router(PROBS.log())
    for t in range(len(PROBS)):
        expected = by_hand(PROBS[t].tolist(), 0.4, E, bias=bias)
        assert out.topk_idx_TK[t][out.keep_TK[t]].tolist() == expected, t
        torch.testing.assert_close(out.gates_TK[t][out.keep_TK[t]], out.scores_TE[t][expected])
    assert out.topk_idx_TK[0][out.keep_TK[0]].tolist() == [0]  # 0.70 first either way
    assert out.topk_idx_TK[1][out.keep_TK[1]].tolist() == [0, 2]  # 0.05 + 0.5 first, then 0.45 -> 0.5 >= 0.4


def test_norm_topk_prob_renormalises_over_the_kept_experts():
    out = prob_router(norm_topk_prob=True, route_scale=2.0)(PROBS.log())
    torch.testing.assert_close(out.gates_TK.sum(1), torch.full((len(PROBS),), 2.0))


def test_layer_output_equals_the_dense_reference_with_the_keep_mask():
    torch.manual_seed(0)
    cfg = compose_config(["router=top_p", "model.num_experts=4"])
    layer = MoELayer(8, 16, 4, 0, cfg.router, layer_id=0)
    layer.reset_parameters(0.5, 0.3, seed=0)
    y, record, routed = check_layer_against_dense_reference(layer)
    per_token = routed.keep_TK.sum(1)
    assert (per_token == 1).any() and (per_token > 1).any()


def test_dynamic_loss_against_a_hand_computation():
    router = prob_router(dynamic_loss_coeff=0.5, aux_loss_coeff=0.01)
    logits = PROBS.log().requires_grad_()
    out = router(logits)
    terms = router.losses(out, RouteContext((1, len(PROBS))))
    assert sorted(terms) == ["aux", "dynamic"]
    entropy = [-sum(q * math.log(q) for q in row) for row in PROBS.tolist()]
    assert terms["dynamic"].item() == pytest.approx(0.5 * sum(entropy) / len(entropy), rel=1e-5)
    # aux: the shared Switch loss on the kept copies
    counts = [0.0] * E
    for t in range(len(PROBS)):
        for e in by_hand(PROBS[t].tolist(), 0.4, E):
            counts[e] += 1
    f = [c / sum(counts) for c in counts]
    P = PROBS.mean(0).tolist()
    assert terms["aux"].item() == pytest.approx(0.01 * E * sum(a * b for a, b in zip(f, P)), rel=1e-5)
    # minimising the entropy sharpens the distribution: the gradient step lowers it
    terms["dynamic"].backward()
    with torch.no_grad():
        stepped = logits - 0.1 * logits.grad
    assert routing_entropy_loss(stepped, 0.5) < terms["dynamic"].detach()


def test_dynamic_loss_is_zero_for_a_one_hot_router_and_maximal_for_a_flat_one():
    assert routing_entropy_loss(torch.tensor([[50.0, 0.0, 0.0, 0.0]]), 1.0).item() == pytest.approx(0.0, abs=1e-12)
    assert routing_entropy_loss(torch.zeros(3, E), 1.0).item() == pytest.approx(math.log(E))
    assert routing_entropy_loss(torch.zeros(0, E), 1.0).item() == 0.0


def test_preset_follows_the_paper():
    cfg = compose_config(["router=top_p", "model.num_experts=16"])
    r = cfg.router
    assert isinstance(r, TopPConfig) and r.method == "top_p"
    assert (r.threshold, r.dynamic_loss_coeff, r.aux_loss_coeff, r.norm_topk_prob) == (0.4, 1e-4, 1e-2, False)
    assert r.top_k == 16  # no cap by default: up to every expert
    assert TopPRouter.experts_per_token(r, 16) == 16.0  # an upper bound; the telemetry measures the real number
    assert compose_config(["router=top_p", "router.top_k=3"]).router.top_k == 3
    assert TopPRouter.num_choices(r, 16) == 16


def problems(*overrides):
    try:
        validate(compose_config(["router=top_p", *overrides]), world_size=1)
    except ConfigError as e:
        return str(e)
    return None


def test_preset_is_valid():
    assert problems() is None
    assert problems("router.threshold=1.0", "router.dynamic_loss_coeff=0") is None


@pytest.mark.parametrize("override, message", [
    ("router.threshold=0", "router.threshold=0.0 must be in (0, 1] (the cumulative probability router=top_p keeps "
                           "experts up to; the paper uses 0.4)"),
    ("router.threshold=1.5", "router.threshold=1.5 must be in (0, 1]"),
    ("router.threshold=nan", "router.threshold=nan must be in (0, 1]"),
    ("router.dynamic_loss_coeff=-1", "router.dynamic_loss_coeff=-1.0 must be >= 0 and finite (the routing-entropy "
                                     "loss weight; 0 turns it off, the paper uses 1e-4)"),
    ("router.dynamic_loss_coeff=inf", "router.dynamic_loss_coeff=inf must be >= 0 and finite"),
    ("router.score_func=sigmoid", "router.score_func=sigmoid does not work with router=top_p, which thresholds "
                                  "the cumulative softmax probability; set router.score_func=softmax"),
    ("router.num_groups=2", "router.num_groups=2: router=top_p has no group-limited routing"),
    ("router.force_balanced=true", "router.force_balanced=true is a top-k benchmarking mode that router=top_p "
                                   "does not have"),
    ("router.top_k=9", "router.top_k=9 must be between 1 and model.num_experts=8"),
])
def test_bad_values_get_one_line_messages(override, message):
    got = problems(override)  # one line per problem: the method's own line names the key, the value and the fix
    assert got is not None and any(message in line for line in got.splitlines()), got


def test_a_misspelled_key_fails_when_composing():
    with pytest.raises(ConfigError, match=r"unknown config key 'router.treshold'; did you mean router.threshold\?"):
        compose_config(["router=top_p", "router.treshold=0.5"])


def test_checks_are_silent_for_the_dataclass_defaults():
    assert list(TopPRouter.check(TopPConfig(), ModelConfig())) == []

"""Expert-choice routing (moetrain/moe/routers/expert_choice.py): each expert takes its top-C tokens of each sequence,
a token gets 0 to E experts through the keep mask, routing of a sequence does not depend on its batch, evaluation
routes by causal token choice, and the layer equals the dense reference. Its preset under expert parallelism and
FSSDP on 2 ranks is tested by tests/test_routing_methods.py.

Legend: B sequences, S sequence length, T = B*S tokens, D model dim, F expert hidden dim, E experts, C bucket.
"""

import math

import pytest
import torch

from moetrain.config.compose import compose_config
from moetrain.config.validate import ConfigError, validate
from moetrain.model.transformer import TransformerLM
from moetrain.moe.layer import MoELayer
from moetrain.moe.routers import RouteContext, build_router
from moetrain.moe.routers.expert_choice import ExpertChoiceConfig, ExpertChoiceRouter, bucket_size
from tests.moe_reference import dense_moe_reference
from tests.train_utils import SMALL

B, S, D, F, E = 3, 10, 8, 16, 4


def make_router(**keys) -> ExpertChoiceRouter:
    torch.manual_seed(0)
    router = build_router(D, E, ExpertChoiceConfig(**keys))
    router.reset_parameters(0.5)
    return router


def inputs(b=B, s=S, seed=3):
    return torch.randn(b * s, D, generator=torch.Generator().manual_seed(seed))


def gate_matrix(routed) -> torch.Tensor:
    """dense_TE: the gate of every kept (token, expert) copy, 0 elsewhere."""
    T = routed.topk_idx_TK.shape[0]
    dense_TE = torch.zeros(T, E)
    dense_TE.index_put_((torch.arange(T)[:, None].expand_as(routed.topk_idx_TK)[routed.keep_TK],
                         routed.topk_idx_TK[routed.keep_TK]), routed.gates_TK[routed.keep_TK].detach())
    return dense_TE


def chosen(routed) -> torch.Tensor:
    """chosen_TE (bool) from the kept copies."""
    T = routed.topk_idx_TK.shape[0]
    out_TE = torch.zeros(T, E, dtype=torch.bool)
    out_TE[torch.arange(T)[:, None].expand_as(routed.topk_idx_TK)[routed.keep_TK],
           routed.topk_idx_TK[routed.keep_TK]] = True
    return out_TE


def test_each_expert_takes_its_top_C_tokens_of_each_sequence():
    router = make_router(top_k=2)
    x_TD = inputs()
    routed = router(x_TD, RouteContext((B, S)))
    C = math.ceil(S * 2 / E)  # 5
    chosen_BSE = chosen(routed).view(B, S, E)
    assert (chosen_BSE.sum(1) == C).all()  # exactly C tokens per expert and sequence
    scores_BSE = routed.scores_TE.detach().view(B, S, E)
    for b in range(B):
        for e in range(E):
            picked, rest = scores_BSE[b, chosen_BSE[b, :, e], e], scores_BSE[b, ~chosen_BSE[b, :, e], e]
            assert picked.min() > rest.max()  # the expert's top-C by score
    torch.testing.assert_close(routed.tokens_per_expert_E, torch.full((E,), float(B * C)))
    # gates are the raw scores of the kept copies (norm_topk_prob false), 0 for copies not kept
    torch.testing.assert_close(gate_matrix(routed), routed.scores_TE.detach() * chosen(routed))
    assert torch.all(routed.gates_TK[~routed.keep_TK] == 0)
    # the balancing bias cannot change which tokens an expert ranks highest
    router.expert_bias_E.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    assert torch.equal(chosen(router(x_TD, RouteContext((B, S)))), chosen(routed))


def test_norm_topk_prob_renormalises_over_the_kept_experts_then_route_scale():
    router = make_router(top_k=2, norm_topk_prob=True, route_scale=2.0)
    routed = router(inputs(), RouteContext((B, S)))
    sums_T = routed.gates_TK.sum(1)
    has_T = routed.keep_TK.any(1)
    torch.testing.assert_close(sums_T[has_T], torch.full_like(sums_T[has_T], 2.0))
    assert torch.all(sums_T[~has_T] == 0) and torch.isfinite(routed.gates_TK).all()


def test_bucket_size():
    assert bucket_size(10, 2, 4, 1.0) == 5 and bucket_size(10, 2, 8, 1.0) == 3  # ceil(2.5)
    assert bucket_size(100, 1, 11, 1.1) == 10  # 1.1 * 100 / 11 = 10.000000000000002: not 11
    assert bucket_size(10, 2, 4, 3.0) == 10  # capped at S


def test_a_bucket_of_at_least_S_gives_every_token_every_expert():
    router = make_router(top_k=2, bucket_factor=3.0)  # ceil(3 * 10 * 2 / 4) = 15 >= S
    routed = router(inputs(), RouteContext((B, S)))
    assert routed.topk_idx_TK.shape == (B * S, E) and routed.keep_TK.all()
    torch.testing.assert_close(routed.tokens_per_expert_E, torch.full((E,), float(B * S)))


def test_experts_per_token_vary_and_a_token_may_get_none():
    """Sigmoid scores, logits = x[:, :E]: token 1+e is peaked on expert e (0.998), token 0 is 0.5 for every expert,
    the others 0.002 everywhere. With C = 2 every expert takes its peaked token and token 0."""
    router = make_router(top_k=1, bucket_factor=0.5, score_func="sigmoid")  # C = ceil(0.5 * 16 * 1 / 4) = 2
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(E, D))
    s = 16
    x_TD = torch.full((s, D), -6.0)
    x_TD[0] = 0.0
    for e in range(E):
        x_TD[1 + e, e] = 6.0
    routed = router(x_TD, RouteContext((1, s)))
    n_T = routed.keep_TK.sum(1)
    assert n_T[0] == E  # chosen by every expert
    assert (n_T[1:1 + E] == 1).all() and (n_T[1 + E:] == 0).all()  # one expert each, then none
    assert routed.topk_idx_TK.shape[1] == E  # K' = the most experts of any token
    assert routed.topk_idx_TK[0].tolist() == list(range(E))  # copies in expert-id order
    for e in range(E):
        assert routed.topk_idx_TK[1 + e, 0] == e and routed.keep_TK[1 + e, 0]
    router.cfg.bucket_factor = 0.25  # C = 1: each expert takes only its peaked token, so K' = 1
    narrow = router(x_TD, RouteContext((1, s)))
    assert narrow.topk_idx_TK.shape[1] == 1 and narrow.keep_TK.sum() == E and not narrow.keep_TK[0].any()


def test_ties_go_to_the_earlier_position_deterministically():
    router = make_router(top_k=2)
    x_TD = torch.zeros(B * S, D)  # every score equal
    for _ in range(2):
        chosen_BSE = chosen(router(x_TD, RouteContext((B, S)))).view(B, S, E)
        C = math.ceil(S * 2 / E)
        expected = torch.zeros(B, S, E, dtype=torch.bool)
        expected[:, :C] = True
        assert torch.equal(chosen_BSE, expected)


def test_routing_of_a_sequence_does_not_depend_on_its_batch():
    router = make_router(top_k=2)
    x_TD = inputs(b=4)
    together = router(x_TD, RouteContext((4, S)))
    alone = [router(x_TD[b * S:(b + 1) * S], RouteContext((1, S))) for b in range(4)]
    torch.testing.assert_close(torch.cat([gate_matrix(r) for r in alone]), gate_matrix(together))
    assert torch.equal(torch.cat([chosen(r) for r in alone]), chosen(together))
    # one long sequence of the same tokens is routed differently: the buckets are per sequence
    assert not torch.equal(chosen(router(x_TD, RouteContext((1, 4 * S)))), chosen(together))


def test_evaluation_routes_by_token_choice_unless_configured():
    router = make_router(top_k=2)
    x_TD = inputs()
    router.eval()
    routed = router(x_TD, RouteContext((B, S)))
    assert routed.keep_TK is None and routed.topk_idx_TK.shape == (B * S, 2)
    assert torch.equal(routed.topk_idx_TK, routed.scores_TE.topk(2, dim=-1).indices)
    torch.testing.assert_close(routed.gates_TK, routed.scores_TE.gather(1, routed.topk_idx_TK))
    keeps_ec = make_router(top_k=2, eval_routing="expert_choice").eval()
    routed = keeps_ec(x_TD, RouteContext((B, S)))
    assert routed.keep_TK is not None
    assert (chosen(routed).view(B, S, E).sum(1) == math.ceil(S * 2 / E)).all()


def small_model(*extra):
    cfg = compose_config(SMALL + ["router=expert_choice", "model.max_seq_len=16", *extra])
    model = TransformerLM(cfg.model, cfg.router)
    model.init_weights(0)
    return model


def prefix_changed(model, tokens_BS, last_values) -> list[bool]:
    """For each value: whether setting the last token to it changes the logits of any earlier position."""
    with torch.no_grad():
        ref = model(tokens_BS)
        changed = []
        for v in last_values:
            other = tokens_BS.clone()
            other[:, -1] = v
            changed.append(not torch.allclose(model(other)[:, :-1], ref[:, :-1], rtol=0, atol=1e-6))
    return changed


def test_evaluation_is_causal_and_training_is_not():
    tokens_BS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    values = [0, 17, 99, 200, 255]
    model = small_model()
    assert any(prefix_changed(model.train(), tokens_BS, values))  # expert choice sees the future
    assert not any(prefix_changed(model.eval(), tokens_BS, values))  # token choice: causal
    leaky = small_model("router.eval_routing=expert_choice").eval()
    assert any(prefix_changed(leaky, tokens_BS, values))


def test_a_later_token_can_take_an_earlier_tokens_expert_in_training():
    layer = MoELayer(D, F, E, 0, ExpertChoiceConfig(top_k=2), layer_id=1)
    layer.reset_parameters(0.5, 0.5, seed=0)
    x_BSD = inputs(b=1).view(1, S, D)
    routed = layer.router(x_BSD.view(S, D), RouteContext((1, S)))
    e = int(torch.nonzero(~chosen(routed)[-1])[0])  # an expert that did not take the last token
    other = x_BSD.clone()
    other[0, -1] = 50 * layer.router.gate.weight[e].detach()  # now the last token is expert e's favourite
    with torch.no_grad():
        y, y_other = layer(x_BSD), layer(other)
        assert not torch.allclose(y[0, :-1], y_other[0, :-1])
        layer.eval()
        # In eval the earlier tokens' routing is exactly the same; their outputs agree to float rounding only,
        # because the changed last token changes an expert's row count, and with it the GEMM's blocking.
        before, after = (layer.router(t.view(S, D), RouteContext((1, S))) for t in (x_BSD, other))
        assert torch.equal(chosen(before)[:-1], chosen(after)[:-1])
        torch.testing.assert_close(layer(x_BSD)[0, :-1], layer(other)[0, :-1], rtol=1e-5, atol=1e-6)


def test_layer_matches_the_dense_reference_with_the_keep_mask():
    layer = MoELayer(D, F, E, 0, ExpertChoiceConfig(top_k=1, bucket_factor=1.0), layer_id=1)
    layer.reset_parameters(0.5, 0.5, seed=0)
    x_TD, dy_TD = inputs(), inputs(seed=4)
    x = x_TD.clone().requires_grad_()
    y, record = layer(x.view(B, S, D), return_record=True)
    (y.view(B * S, D) * dy_TD).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}

    layer.zero_grad()
    x_ref = x_TD.clone().requires_grad_()
    routed = layer.router(x_ref, RouteContext((B, S)))
    assert (~routed.keep_TK).all(1).any() and (routed.keep_TK.sum(1) > 1).any()  # 0 and several experts occur
    w = layer.experts
    y_ref = dense_moe_reference(x_ref, routed.topk_idx_TK, routed.gates_TK, w.w1_EDF, w.w3_EDF, w.w2_EFD,
                                routed.keep_TK.float())
    (y_ref * dy_TD).sum().backward()
    torch.testing.assert_close(y.view(B * S, D), y_ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    for n, p in layer.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
    assert torch.all(y.view(B * S, D)[(~routed.keep_TK).all(1)] == 0)  # no expert: the residual carries it
    C = math.ceil(S * 1 / E)
    assert record.num_copies == B * C * E and record.num_dropped == 0 and record.losses == {}


def test_preset_composes_and_validates():
    cfg = compose_config(["router=expert_choice"])
    r = cfg.router
    assert isinstance(r, ExpertChoiceConfig) and r.method == "expert_choice"
    assert (r.top_k, r.bucket_factor, r.eval_routing, r.score_func) == (2, 1.0, "topk", "softmax")
    assert not r.norm_topk_prob and r.bias_update_rate == 0 and r.capacity_factor is None
    validate(cfg, world_size=1)
    assert ExpertChoiceRouter.experts_per_token(r, 8) == 2.0


@pytest.mark.parametrize("override, message", [
    ("router.bucket_factor=0", "router.bucket_factor=0.0 must be a finite number > 0"),
    ("router.bucket_factor=nan", "router.bucket_factor=nan must be a finite number > 0"),
    ("router.bucket_factor=-1", "router.bucket_factor=-1.0 must be a finite number > 0"),
    ("router.eval_routing=causal", "router.eval_routing='causal' is unknown; choose one of topk, expert_choice"),
    ("router.num_groups=2", "router.num_groups=2: router=expert_choice has no group-limited routing"),
    ("router.force_balanced=true", "router.force_balanced=true is a top-k benchmarking mode that router=expert_choice does not have"),
])
def test_config_check_messages(override, message, tmp_path):
    with pytest.raises(ConfigError) as e:
        validate(compose_config(["router=expert_choice", override, f"trainer.run_dir={tmp_path}"]), world_size=1)
    assert len(str(e.value).splitlines()) == 1 and message in str(e.value)


def test_a_typo_in_a_key_fails_when_composing():
    with pytest.raises(ConfigError, match="router.bucket_factr.*did you mean router.bucket_factor"):
        compose_config(["router=expert_choice", "router.bucket_factr=1"])

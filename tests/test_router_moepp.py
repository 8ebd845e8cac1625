"""MoE++ routing (moetrain/moe/routers/moepp.py): the router against a by-hand computation, the layer against the dense
reference plus the zero/copy/constant experts computed directly, zero-computation copies never dispatched (one
process and the all-to-all on 2 ranks), the heterogeneous load-balancing loss by hand (also global over 2 ranks), the
gating residuals in a 2-MoE-layer model (the carry changes the second layer's routing, its gradient reaches the first
layer's gate, activation checkpointing changes nothing) and the config checks. Its preset under expert parallelism
and FSSDP on 2 ranks is tested by tests/test_routing_methods.py.

Legend: T tokens, D model dim, F expert hidden dim, E FFN experts, X = E + 4 choices (1 zero, 1 copy, 2 constant
experts: ids E, E+1, E+2 and E+3), K = 2.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as Fn

from moetrain.config.compose import compose_config
from moetrain.config.validate import check
from moetrain.model.transformer import TransformerLM
from moetrain.moe.layer import MoELayer
from moetrain.moe.routers import RouteContext, build_router
from moetrain.moe.routers.moepp import MoEPPConfig, MoEPPRouter, choice_kinds
from moetrain.parallel.mesh import ParallelContext, build_groups
from moetrain.parallel.moe_layer import build_moe_layer
from tests.distributed import run_distributed
from tests.moe_reference import dense_moe_reference

D, F, E, K, T = 8, 16, 8, 2, 64
ZERO, COPY, CONST = E, E + 1, (E + 2, E + 3)
TOL = dict(rtol=1e-5, atol=1e-6)


def preset(**keys) -> MoEPPConfig:
    cfg = compose_config(["router=moepp", f"model.num_experts={E}"]).router
    return dataclasses.replace(cfg, **keys)


def inputs(n=T, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)


def make_layer(cfg=None, group=None):
    torch.manual_seed(0)
    cfg = preset() if cfg is None else cfg
    if group is None:
        layer = MoELayer(D, F, E, 0, cfg, layer_id=0)
    else:
        layer = build_moe_layer(D, F, E, 0, cfg, layer_id=0, ep_group=group, dp_group=group)
    layer.reset_parameters(0.5, 0.3, seed=0)  # a wide gate: every kind of expert gets chosen by some token
    return layer


# ----------------------------------------------------------------------------------------------- by-hand references
def route_by_hand(router, x_TD, carry_TX=None):
    """(choice_TK, gates_TK, probs_TX, logits_TX), Eq. 1 and 6 written out."""
    logits_TX = x_TD @ router.gate.weight.T
    if carry_TX is not None:
        logits_TX = logits_TX + carry_TX @ router.residual_XX.T
    probs_TX = torch.softmax(logits_TX, -1)
    bias_X = torch.cat([router.expert_bias_E, torch.zeros(logits_TX.shape[1] - router.num_experts)])
    biased_TX = probs_TX.detach() + bias_X
    choice_TK = biased_TX.topk(K, -1).indices
    return choice_TK, probs_TX.gather(1, choice_TK), probs_TX, logits_TX


def virtual_by_hand(router, x_TD, choice_TK, gates_TK):
    """The zero/copy/constant experts' contribution, one copy at a time."""
    rows = []
    for t in range(x_TD.shape[0]):
        out = torch.zeros(D)
        for k in range(K):
            c, g, x = int(choice_TK[t, k]), gates_TK[t, k], x_TD[t]
            if c == COPY:
                out = out + g * x
            elif c in CONST:
                j = c - CONST[0]
                a = torch.softmax(router.const_gate_N2D[j] @ x, -1)
                out = out + g * (a[0] * x + a[1] * router.const_value_ND[j])
            # FFN experts: the dense reference; the zero expert adds nothing
        rows.append(out)
    return torch.stack(rows)


def balance_loss_by_hand(probs_TX, choice_TK, coeff=0.01, tau=0.75, counts_X=None, tokens=None):
    """coeff * sum_i eta_i f_i P_i, f_i = (copies choosing i) / T (optionally global counts), P_i = mean_t p_ti."""
    X = probs_TX.shape[1]
    if counts_X is None:
        counts_X, tokens = torch.bincount(choice_TK.flatten(), minlength=X).float(), probs_TX.shape[0]
    eta_X = torch.tensor([1.0] * E + [tau] * (X - E))
    return coeff * (eta_X * counts_X / tokens * probs_TX.mean(0)).sum()


# ----------------------------------------------------------------------------------------------------------- config
def test_preset_is_the_papers_setting():
    cfg = preset()
    assert isinstance(cfg, MoEPPConfig) and cfg.method == "moepp"
    assert (cfg.top_k, cfg.score_func, cfg.norm_topk_prob, cfg.bias_update_rate, cfg.aux_loss_coeff) == \
        (2, "softmax", False, 0.0, 0.01)
    assert (cfg.num_zero_experts, cfg.num_copy_experts, cfg.num_constant_experts) == (1, 1, 2)
    assert cfg.gating_residual and cfg.zc_loss_weight == 0.75
    assert MoEPPRouter.num_choices(cfg, E) == E + 4 and MoEPPRouter.experts_per_token(cfg, E) == 2.0
    assert choice_kinds(cfg, 2) == ["ffn", "ffn", "zero", "copy", "constant", "constant"]
    router = build_router(D, E, cfg)
    assert router.gate.weight.shape == (E + 4, D) and router.residual_XX.shape == (E + 4, E + 4)
    names = {n for n, _ in router.named_parameters()}
    assert names == {"gate.weight", "residual_XX", "const_gate_N2D", "const_value_ND"}
    assert "residual_XX" not in {n for n, _ in build_router(D, E, preset(gating_residual=False)).named_parameters()}


@pytest.mark.parametrize("overrides,needle", [
    (["router.num_zero_experts=-1"], "router.num_zero_experts=-1 must be >= 0"),
    (["router.num_copy_experts=-2"], "router.num_copy_experts=-2 must be >= 0"),
    (["router.num_constant_experts=-1"], "router.num_constant_experts=-1 must be >= 0"),
    (["router.zc_loss_weight=-0.5"], "router.zc_loss_weight=-0.5 must be a finite number >= 0"),
    (["router.num_groups=2"], "router.num_groups=2: router=moepp has no group-limited routing"),
    (["router.force_balanced=true"], "router.force_balanced=true is a top-k benchmarking mode that router=moepp does not have"),
    (["router.top_k=13"], "router.top_k=13 must be between 1 and model.num_experts=8 plus the 4 experts of "
                          "router=moepp"),
])
def test_config_check_messages(overrides, needle):
    errors = check(compose_config(["router=moepp", "model.num_experts=8", *overrides]), world_size=1)
    assert any(needle in e for e in errors), errors
    assert all("\n" not in e for e in errors)


def test_valid_preset_has_no_config_problems():
    assert check(compose_config(["router=moepp"]), world_size=1) == []
    assert check(compose_config(["router=moepp", "router.top_k=12"]), world_size=1) == []  # top-k over X = 8 + 4


def test_moepp_keys_exist_only_under_the_preset():
    from moetrain.config.validate import ConfigError

    with pytest.raises(ConfigError, match="zc_loss_weight"):
        compose_config(["router.zc_loss_weight=0.5"])


# ---------------------------------------------------------------------------------------------------------- routing
def test_router_matches_a_by_hand_computation():
    layer = make_layer()
    router = layer.router
    router.expert_bias_E.copy_(torch.linspace(-0.05, 0.05, E))  # the bias selects among FFN experts only
    x, _ = inputs()
    routed = router(x, RouteContext((1, T)))
    choice_TK, gates_TK, probs_TX, logits_TX = route_by_hand(router, x)
    torch.testing.assert_close(routed.logits_TE, logits_TX, **TOL)
    torch.testing.assert_close(routed.scores_TE, probs_TX, **TOL)
    assert torch.equal(routed.stats["choice_idx_TK"], choice_TK)
    torch.testing.assert_close(routed.gates_TK, gates_TK, **TOL)  # no renormalisation (Eq. 1)
    keep_TK = choice_TK < E
    assert torch.equal(routed.keep_TK, keep_TK)
    assert torch.equal(routed.topk_idx_TK, torch.where(keep_TK, choice_TK, 0))  # valid id, never dispatched
    assert routed.topk_idx_TK.min() >= 0 and routed.topk_idx_TK.max() < E
    assert torch.equal(routed.tokens_per_expert_E, torch.bincount(choice_TK[keep_TK], minlength=E).float())
    assert set(choice_TK.flatten().tolist()) >= {ZERO, COPY, *CONST}, "every kind of virtual expert is chosen"
    torch.testing.assert_close(routed.carry, logits_TX, **TOL)  # the first layer's carry: its own logits


def test_norm_topk_prob_renormalises_over_all_k_choices():
    layer = make_layer(preset(norm_topk_prob=True, route_scale=2.0))
    x, _ = inputs()
    routed = layer.router(x)
    _, gates_TK, _, _ = route_by_hand(layer.router, x)
    torch.testing.assert_close(routed.gates_TK, 2.0 * gates_TK / gates_TK.sum(-1, keepdim=True), **TOL)


def test_layer_matches_dense_reference_plus_virtual_experts():
    """Output, input gradient and every parameter gradient (router losses included) against the dense reference over
    the FFN experts with the keep mask plus the zero-computation experts computed directly."""
    layer = make_layer()
    router, w = layer.router, layer.experts
    x, dy = inputs()
    params = [router.gate.weight, router.const_gate_N2D, router.const_value_ND, w.w1_EDF, w.w3_EDF, w.w2_EFD]

    x_ref = x.clone().requires_grad_()
    choice_TK, gates_TK, probs_TX, _ = route_by_hand(router, x_ref)
    keep_TK = choice_TK < E
    y_ref = dense_moe_reference(x_ref, torch.where(keep_TK, choice_TK, 0), gates_TK, w.w1_EDF, w.w3_EDF, w.w2_EFD,
                                keep_TK.float()) + virtual_by_hand(router, x_ref, choice_TK, gates_TK)
    aux_ref = balance_loss_by_hand(probs_TX, choice_TK)
    grads_ref = torch.autograd.grad((y_ref * dy).sum() + aux_ref, [x_ref, *params])

    x_in = x.clone().requires_grad_()
    y, record = layer(x_in[None], return_record=True)
    torch.testing.assert_close(y[0], y_ref.detach(), **TOL)
    assert set(record.losses) == {"aux"}
    torch.testing.assert_close(record.losses["aux"], aux_ref.detach(), **TOL)
    ((y[0] * dy).sum() + record.loss).backward()
    torch.testing.assert_close(x_in.grad, grads_ref[0], **TOL)
    for p, g_ref in zip(params, grads_ref[1:]):
        torch.testing.assert_close(p.grad, g_ref, **TOL)
    assert router.residual_XX.grad is None  # one layer: no carry, the residual matrix takes no part


def test_virtual_copies_are_not_dispatched():
    layer = make_layer()
    plans = []
    original = layer.dispatcher.plan
    layer.dispatcher.plan = lambda *a, **kw: plans.append(original(*a, **kw)) or plans[-1]
    x, _ = inputs()
    _, record = layer(x[None], return_record=True)
    keep_TK = layer.router(x).keep_TK
    kept = int(keep_TK.sum())
    assert 0 < kept < T * K
    assert plans[0].num_rows == kept  # the plan holds the kept FFN copies only
    assert record.num_copies == kept and int(record.tokens_per_local_expert_L.sum()) == kept
    assert float(record.tokens_per_expert_E.sum()) == kept


def test_all_zero_computation_tokens_get_exactly_their_virtual_output():
    """A token whose K choices are both zero-computation experts sends nothing and gets only local_out."""
    layer = make_layer()
    with torch.no_grad():  # make the copy expert and the first constant expert win for every token
        layer.router.gate.weight[COPY] += 50 * layer.router.gate.weight.norm(dim=0)
        layer.router.gate.weight[CONST[0]] += 50 * layer.router.gate.weight.norm(dim=0)
    x, _ = inputs(8)
    x = x.abs()  # positive features: the boosted rows dominate
    routed = layer.router(x)
    assert not routed.keep_TK.any()
    y = layer(x[None])[0]
    torch.testing.assert_close(y, routed.local_out_TD, **TOL)


def test_without_virtual_experts_it_is_top_k_with_gating_residuals():
    cfg = preset(num_zero_experts=0, num_copy_experts=0, num_constant_experts=0)
    layer = make_layer(cfg)
    x, _ = inputs()
    routed = layer.router(x)
    assert routed.keep_TK is None and routed.local_out_TD is None
    assert routed.scores_TE.shape == (T, E) and layer.router.residual_XX.shape == (E, E)


def _two_rank_body(rank, world):
    ctx = build_groups(ParallelContext(ep=world))
    layer = make_layer(group=ctx.ep_group)
    plans = []
    original = layer.dispatcher.plan
    layer.dispatcher.plan = lambda *a, **kw: plans.append(original(*a, **kw)) or plans[-1]
    x, dy = inputs()
    mine = slice(rank * T // world, (rank + 1) * T // world)
    y, record = layer(x[mine][None], return_record=True)
    routed = layer.router(x[mine])
    return dict(y=y[0].detach(), sent=sum(plans[0].send_splits), received=int(plans[0].tokens_per_local_expert_L.sum()),
                kept=int(routed.keep_TK.sum()), aux=float(record.losses["aux"]),
                probs=routed.scores_TE.detach(), choice=routed.stats["choice_idx_TK"])


def test_all_to_all_carries_only_ffn_copies_and_the_loss_is_global_on_two_ranks():
    results = run_distributed(_two_rank_body, 2)
    x, _ = inputs()
    ref_layer = make_layer()
    torch.testing.assert_close(torch.cat([r["y"] for r in results]), ref_layer(x[None])[0].detach(), **TOL)
    for r in results:
        assert r["sent"] == r["kept"] < (T // 2) * K  # rows leaving this rank (itself included): kept FFN copies
    assert sum(r["received"] for r in results) == sum(r["kept"] for r in results)
    choice_TK = torch.cat([r["choice"] for r in results])
    counts_X = torch.bincount(choice_TK.flatten(), minlength=E + 4).float()
    for r in results:  # f from the global counts and tokens, P from this rank's tokens
        expected = balance_loss_by_hand(r["probs"], r["choice"], counts_X=counts_X, tokens=T)
        assert r["aux"] == pytest.approx(float(expected), rel=1e-5)
    # the ranks' mean is the one-process loss of the global batch
    _, record = ref_layer(x[None], return_record=True)
    assert sum(r["aux"] for r in results) / 2 == pytest.approx(float(record.losses["aux"].detach()), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------- losses
def test_heterogeneous_loss_weights_zero_computation_experts_by_tau():
    layer = make_layer(preset(zc_loss_weight=0.25, aux_loss_coeff=0.1))
    x, _ = inputs()
    routed = layer.router(x)
    choice_TK, probs_TX = routed.stats["choice_idx_TK"], routed.scores_TE
    aux = layer.router.losses(routed, RouteContext((1, T)))["aux"]
    torch.testing.assert_close(aux, balance_loss_by_hand(probs_TX, choice_TK, coeff=0.1, tau=0.25), **TOL)
    # virtual copies count as chosen although they are not kept (the shared aux term would ignore them)
    f_X = torch.bincount(choice_TK.flatten(), minlength=E + 4).float() / T
    assert f_X[E:].sum() > 0 and f_X.sum() == pytest.approx(K)
    # tau = 0: only the FFN experts are balanced
    layer.router.cfg = preset(zc_loss_weight=0.0, aux_loss_coeff=0.1)
    aux0 = layer.router.losses(routed, RouteContext((1, T)))["aux"]
    torch.testing.assert_close(aux0, 0.1 * (f_X[:E] * probs_TX.mean(0)[:E]).sum(), **TOL)


def test_seq_aux_and_z_losses_are_over_all_choices():
    cfg = preset(seq_aux_loss_coeff=0.01, z_loss_coeff=0.001)
    layer = make_layer(cfg)
    x, _ = inputs()
    routed = layer.router(x)
    terms = layer.router.losses(routed, RouteContext((4, T // 4)))
    assert set(terms) == {"aux", "seq_aux", "z"}
    X = E + 4
    probs_BSX = routed.scores_TE.view(4, T // 4, X)
    counts_BX = Fn.one_hot(routed.stats["choice_idx_TK"].view(4, -1), X).sum(1).float()
    expected = 0.01 * ((counts_BX * X / (K * T // 4)) * probs_BSX.mean(1)).sum(-1).mean()
    torch.testing.assert_close(terms["seq_aux"], expected, **TOL)
    torch.testing.assert_close(terms["z"], 0.001 * torch.logsumexp(routed.logits_TE, -1).square().mean(), **TOL)


# ------------------------------------------------------------------------------------------------ gating residuals
def small_model(activation_checkpointing="none", seed=0):
    cfg = compose_config(["router=moepp", "model.dim=16", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
                          "model.ffn_hidden=32", "model.num_experts=4", "model.moe_hidden=16",
                          "model.first_k_dense=0"])
    model = TransformerLM(cfg.model, cfg.router, activation_checkpointing=activation_checkpointing)
    model.init_weights(seed)
    return model


def tokens(seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (2, 12), generator=g), torch.randint(0, 256, (2, 12), generator=g)


def capture_router_inputs(model):
    """Record (x_TD, ctx) of every router call, in call order."""
    calls = []
    for moe in model.moe_layers():
        original = moe.router.forward

        def forward(x_TD, ctx=None, _original=original):
            calls.append((x_TD.detach(), ctx))
            return _original(x_TD, ctx)
        moe.router.forward = forward
    return calls


def test_the_carry_changes_the_second_layers_routing_and_its_gradient_reaches_the_first_gate():
    model = small_model()
    first, second = (m.router for m in model.moe_layers())
    with torch.no_grad():  # a strong residual, so the carry visibly changes the choices
        second.residual_XX.copy_(torch.randn(second.residual_XX.shape, generator=torch.Generator().manual_seed(0)))
    calls = capture_router_inputs(model)
    inputs_BS, targets_BS = tokens()
    logits, records = model(inputs_BS, return_records=True)
    assert len(records) == 2 and calls[0][1].carry is None  # the first MoE layer gets no carry
    x1, ctx1 = calls[1]
    assert ctx1.carry is records[0].carry and records[0].carry.shape == (24, 8)
    torch.testing.assert_close(records[0].carry, calls[0][0] @ first.gate.weight.T, **TOL)

    with_carry = second.route(x1, RouteContext(ctx1.batch_shape, carry=records[0].carry))
    without = second.route(x1, RouteContext(ctx1.batch_shape))
    choice_ref, _, _, logits_ref = route_by_hand(second, x1, records[0].carry)
    torch.testing.assert_close(with_carry.logits_TE, logits_ref, **TOL)
    assert not torch.equal(with_carry.stats["choice_idx_TK"], without.stats["choice_idx_TK"])
    torch.testing.assert_close(records[1].carry, logits_ref, **TOL)  # the second layer's carry includes the residual

    # through the carry alone (the second router on a fixed input), the gradient reaches the first layer's gate
    g = torch.autograd.grad(with_carry.logits_TE.sum(), [first.gate.weight, second.residual_XX], retain_graph=True)
    assert g[0].abs().sum() > 0 and g[1].abs().sum() > 0
    assert without.logits_TE.grad_fn is not None
    detached = second.route(x1, RouteContext(ctx1.batch_shape, carry=records[0].carry.detach()))
    assert torch.autograd.grad(detached.logits_TE.sum(), first.gate.weight, allow_unused=True)[0] is None

    # in the whole model: W_g of the second layer learns, the first layer's W_g takes no part
    loss = Fn.cross_entropy(logits.flatten(0, 1), targets_BS.flatten()) + sum(r.loss for r in records)
    loss.backward()
    assert second.residual_XX.grad.abs().sum() > 0 and first.residual_XX.grad is None


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    inputs_BS, targets_BS = tokens()
    results = []
    for ckpt in ("none", "full"):
        model = small_model(activation_checkpointing=ckpt)
        logits, records = model(inputs_BS, return_records=True)
        loss = Fn.cross_entropy(logits.flatten(0, 1), targets_BS.flatten()) + sum(r.loss for r in records)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                        [r.tokens_per_expert_E for r in records]))
    (loss0, grads0, counts0), (loss1, grads1, counts1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-7)
    assert grads0.keys() == grads1.keys() and any("residual_XX" in n for n in grads0)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    for a, b in zip(counts0, counts1):
        assert torch.equal(a, b)


def test_gating_residual_off_hands_no_carry():
    cfg = compose_config(["router=moepp", "router.gating_residual=false", "model.dim=16", "model.n_layers=2",
                          "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_hidden=32", "model.num_experts=4",
                          "model.moe_hidden=16", "model.first_k_dense=0"])
    model = TransformerLM(cfg.model, cfg.router)
    model.init_weights(0)
    _, records = model(tokens()[0], return_records=True)
    assert all(r.carry is None for r in records)

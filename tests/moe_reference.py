"""A deliberately simple single-process MoE reference: every expert on every token, then pick and weight.

    y_TD[t] = sum_k gates_TK[t, k] * SwiGLU_{topk_idx_TK[t, k]}(x_TD[t])

No permutation, no grouped GEMM, no communication: what every optimised path must reproduce.
"""

import torch
import torch.nn.functional as F


def dense_moe_reference(x_TD, topk_idx_TK, gates_TK, w1_EDF, w3_EDF, w2_EFD, keep_TK=None):
    E = w1_EDF.shape[0]
    out_ETD = torch.stack([(F.silu(x_TD @ w1_EDF[e]) * (x_TD @ w3_EDF[e])) @ w2_EFD[e] for e in range(E)])
    T = x_TD.shape[0]
    picked_TKD = out_ETD[topk_idx_TK, torch.arange(T)[:, None]]
    weights_TK = gates_TK if keep_TK is None else gates_TK * keep_TK
    return (picked_TKD * weights_TK[..., None]).sum(1)


def global_inputs(T, D, seed=42):
    """The global batch x_TD and the upstream gradient dy_TD that ranks slice from."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, D, generator=g), torch.randn(T, D, generator=g)


def run_layer(layer, x_TD, dy_TD, bias=None):
    """Forward one MoE layer on x_TD (optionally with a forced router bias), backward sum(y * dy).

    Returns (y, dx, parameter gradients, routing record, weights_alive): weights_alive tells whether FSSDP's gathered
    expert weights were still alive after the forward (None when nothing was gathered)."""
    if bias is not None:
        layer.router.expert_bias_E.copy_(torch.tensor(bias))
    x = x_TD.clone().requires_grad_()
    y, record = layer(x[None], return_record=True)
    y = y.squeeze(0)
    ref = getattr(layer.experts, "last_materialized", None)
    weights_alive = None if ref is None else ref() is not None
    (y * dy_TD).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return y.detach(), x.grad, grads, record, weights_alive


def assert_ranks_match_reference(results, y_ref, dx_ref, grads, ids_key="expert_ids", rtol=1e-5, atol=1e-6):
    """Per-rank results of a sharded layer against the single-process run on the global batch: outputs and input
    gradients concatenate to the reference, the router gradient sums to it over ranks, and each expert's gradient
    is the sum over the ranks holding it (`results[r][ids_key]` lists the global ids of rank r's expert rows)."""
    torch.testing.assert_close(torch.cat([r["y"] for r in results]), y_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(torch.cat([r["dx"] for r in results]), dx_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(sum(r["grads"]["router.gate.weight"] for r in results), grads["router.gate.weight"],
                               rtol=rtol, atol=atol)
    for name in ("experts.w1_EDF", "experts.w3_EDF", "experts.w2_EFD"):
        summed = torch.zeros_like(grads[name])
        for r in results:
            summed[r[ids_key]] += r["grads"][name]
        torch.testing.assert_close(summed, grads[name], rtol=rtol, atol=atol)


def check_layer_against_dense_reference(layer, T=48, seed=42):
    """One local MoE layer on T random tokens against `dense_moe_reference` with its router's own decision (keep
    mask included): outputs and input gradients (through the gates' graph) agree. Returns (y, record, routed) for
    method-specific checks."""
    x, dy = global_inputs(T, layer.dim, seed)
    x = x.requires_grad_()
    y, record = layer(x[None], return_record=True)
    routed = layer.router(x.detach())
    w = layer.experts
    y_ref = dense_moe_reference(x, routed.topk_idx_TK, routed.gates_TK, w.w1_EDF, w.w3_EDF, w.w2_EFD,
                                None if routed.keep_TK is None else routed.keep_TK.float())
    torch.testing.assert_close(y[0], y_ref, rtol=1e-5, atol=1e-6)
    assert record.num_dropped == 0
    assert record.num_copies == (routed.topk_idx_TK.numel() if routed.keep_TK is None else int(routed.keep_TK.sum()))
    (g_layer,) = torch.autograd.grad((y[0] * dy).sum(), x)
    x2 = x.detach().clone().requires_grad_()
    r2 = layer.router(x2)
    y2 = dense_moe_reference(x2, r2.topk_idx_TK, r2.gates_TK, w.w1_EDF, w.w3_EDF, w.w2_EFD,
                             None if r2.keep_TK is None else r2.keep_TK.float())
    (g_ref,) = torch.autograd.grad((y2 * dy).sum(), x2)
    torch.testing.assert_close(g_layer, g_ref, rtol=1e-5, atol=1e-6)
    return y[0].detach(), record, routed

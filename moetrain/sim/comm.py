"""Alpha-beta communication model of the collectives a training step runs.

Legend: W ranks in the group (consecutive global ranks, G = devices per node, N = nodes the group spans),
M_SD bytes rank s sends to rank d (the diagonal stays local and costs nothing), a/bw a link's alpha and bandwidth.

Uneven all-to-all (the token dispatch and combine, FSSDP's spAG/spRS), per rank s, flat (what NCCL's and gloo's
all_to_all_single do: one message to each peer, intra- and inter-node links used at once):
    t_s = max( (G'-1)*a_intra + max(sent_intra_s, received_intra_s)/bw_intra,
               (W-G')*a_inter + max(sent_inter_s, received_inter_s)/bw_inter )      G' = min(G, W)
    t = max over s of t_s              (the collective ends when its slowest rank is done)
Hierarchical (two-dimensional, Tutel's 2DH; nodes > 1, W a multiple of G): first an intra-node all-to-all that
gathers, on local rank l, every row bound for local rank l of any node; then an inter-node all-to-all between the
ranks with the same local index:
    t = max_s [(G-1)*a_intra + phase-1 bytes_s/bw_intra] + max_s [(N-1)*a_inter + phase-2 bytes_s/bw_inter]
A link marked `shared` (the CPU machine's loopback: every rank's bytes go through one kernel path or one rate
limiter) carries the sum of all ranks' bytes: t = (W-1)*a + sum_s sent_s / bw.

Ring collectives over W ranks of a buffer of S bytes (per rank: its shard is S/W), bandwidth of the slowest link the
ring crosses (inter-node when the group spans nodes):
    all-gather = reduce-scatter = (W-1)*a + (W-1)/W * S / bw;   all-reduce = 2 x that.
"""

from __future__ import annotations

import torch

from moetrain.sim.cluster import Cluster, Link


def _link_time(link: Link, messages: int, sent: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
    if link.shared:
        return messages * link.alpha + sent.sum() / link.bandwidth + 0 * sent
    return messages * link.alpha + torch.maximum(sent, received) / link.bandwidth


def all_to_all_time(bytes_SD: torch.Tensor, cluster: Cluster, hierarchical: bool = False) -> float:
    """Seconds of one uneven all-to-all whose rank s sends bytes_SD[s, d] to rank d (see the module docstring)."""
    W = bytes_SD.shape[0]
    if W <= 1:
        return 0.0
    m = bytes_SD.double().clone()
    m.fill_diagonal_(0)
    if float(m.sum()) == 0:
        return 0.0
    G = min(cluster.devices_per_node, W)
    node_W = torch.arange(W) // G
    same_SD = node_W[:, None] == node_W[None, :]
    N = int(node_W.max()) + 1
    if hierarchical and N > 1 and W % G == 0:
        m4 = m.view(N, G, N, G)  # [n, l, d, k]: source node n, source local l, destination node d, local k
        off_local_LK = (~torch.eye(G, dtype=torch.bool)).double()
        off_node_ND = (~torch.eye(N, dtype=torch.bool)).double()
        p1_sent = torch.einsum("nldk,lk->nl", m4, off_local_LK)  # (n, l) hands local peer k the rows for local k
        p1_recv = torch.einsum("nldk,lk->nk", m4, off_local_LK)
        p2_sent = torch.einsum("nldk,nd->nk", m4, off_node_ND)  # (n, k) sends node d's local k all of node n's rows
        p2_recv = torch.einsum("nldk,nd->dk", m4, off_node_ND)
        t1 = _link_time(cluster.intra, G - 1, p1_sent.flatten(), p1_recv.flatten()).max()
        t2 = _link_time(cluster.inter, N - 1, p2_sent.flatten(), p2_recv.flatten()).max()
        return float(t1 + t2)
    sent_intra, recv_intra = (m * same_SD).sum(1), (m * same_SD).sum(0)
    sent_inter, recv_inter = (m * ~same_SD).sum(1), (m * ~same_SD).sum(0)
    t = _link_time(cluster.intra, G - 1, sent_intra, recv_intra)
    if N > 1:
        t = torch.maximum(t, _link_time(cluster.inter, W - G, sent_inter, recv_inter))
    return float(t.max())


def ring_link(cluster: Cluster, group_size: int, stride: int = 1) -> Link:
    """The slowest link a ring over `group_size` ranks spaced `stride` apart crosses."""
    span = (group_size - 1) * stride + 1
    return cluster.intra if span <= cluster.devices_per_node else cluster.inter


def all_gather_time(total_bytes: float, group_size: int, cluster: Cluster, stride: int = 1) -> float:
    """Ring all-gather (or reduce-scatter) of a buffer of `total_bytes` over `group_size` ranks."""
    if group_size <= 1 or total_bytes <= 0:
        return 0.0
    link = ring_link(cluster, group_size, stride)
    volume = (group_size - 1) / group_size * total_bytes
    if link.shared:
        volume *= group_size
    return (group_size - 1) * link.alpha + volume / link.bandwidth


def all_reduce_time(total_bytes: float, group_size: int, cluster: Cluster, stride: int = 1) -> float:
    return 2 * all_gather_time(total_bytes, group_size, cluster, stride)

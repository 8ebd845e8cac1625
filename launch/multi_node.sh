#!/usr/bin/env bash
# Multi node: run the same command on every node.
#   launch/multi_node.sh NNODES NPROC_PER_NODE MASTER_HOST:PORT [OVERRIDES...]
# Expert parallelism is laid out innermost (ep ranks are consecutive), so keep parallel.ep <= NPROC_PER_NODE
# to keep the all-to-all on the intra-node interconnect.
set -euo pipefail
NNODES=${1:?usage: launch/multi_node.sh NNODES NPROC_PER_NODE MASTER_HOST:PORT [OVERRIDES...]}
NPROC=${2:?missing NPROC_PER_NODE}
ENDPOINT=${3:?missing MASTER_HOST:PORT}
shift 3
exec torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC" --rdzv_backend=c10d --rdzv_endpoint="$ENDPOINT" \
  --rdzv_id="${RDZV_ID:-moetrain}" -m moetrain.train "$@"

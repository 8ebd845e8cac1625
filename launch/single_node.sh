#!/usr/bin/env bash
# Single node, N processes (GPUs, or CPU ranks with gloo):  launch/single_node.sh 8 parallel.ep=8 model=small
set -euo pipefail
NPROC=${1:?usage: launch/single_node.sh NPROC [OVERRIDES...]}
shift
exec torchrun --standalone --nproc_per_node="$NPROC" -m moetrain.train "$@"

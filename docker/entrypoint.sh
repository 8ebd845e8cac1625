#!/usr/bin/env bash
# The container's entry point.
#
#   docker run ... moetrain [OVERRIDE ...]     train: one process per visible GPU
#   docker run ... moetrain COMMAND [ARG ...]  run COMMAND instead (bash, moetrain-report runs/a, torchrun ..., pytest)
#
# Arguments for moetrain-train (the first one contains "=" or starts with "-", or there are none) train:
#   - with 2 or more GPUs visible (torch.cuda.device_count(): --gpus and CUDA_VISIBLE_DEVICES decide), through
#     torchrun --standalone --nproc_per_node=<that count> -m moetrain.train, one process per GPU on this node;
#   - with 0 or 1 GPU, as one process: moetrain-train;
#   - when a launcher has already started one process per GPU (RANK is set: torchrun, or srun with the variables
#     derived from SLURM), as that one process: moetrain-train.
# Hydra's other actions (a sweep with -m, --cfg, --info, --help, ...) run once, as moetrain-train: a sweep launches
# its own jobs.
# Several nodes: give the launcher command yourself (docs/cluster.md). exec keeps the trainer (or torchrun, which
# forwards it) the receiver of the SIGTERM that `docker stop` and preemption send, so it checkpoints before it exits.
set -euo pipefail

if [[ $# -gt 0 && "$1" != -* && "$1" != *=* ]]; then
  exec "$@"
fi
if [[ -n "${RANK:-}" ]]; then
  exec moetrain-train "$@"
fi
for arg in "$@"; do
  case "$arg" in
    -m|--multirun|-c|--cfg|-i|--info|-h|--help|--hydra-help|--version|-sc|--shell-completion)
      exec moetrain-train "$@" ;;
  esac
done
gpus="$(python -c 'import torch; print(torch.cuda.device_count())')"
if [[ "${gpus}" -ge 2 ]]; then
  exec torchrun --standalone --nproc_per_node="${gpus}" -m moetrain.train "$@"
fi
exec moetrain-train "$@"

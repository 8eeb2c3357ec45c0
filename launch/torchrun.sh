#!/usr/bin/env bash
# Train with N processes on this machine:
#   launch/torchrun.sh 8 --config configs/gpt2-124m.yaml data.path=... data.tokenizer=...
# or on each of several machines (same command on every node; c10d rendezvous, no ssh):
#   NNODES=2 RDZV_ENDPOINT=node01:29400 launch/torchrun.sh 8 --config ...
# N defaults to the number of GPUs (1 without any). This is `megagpt launch local`, which
# sets OMP_NUM_THREADS (cores / processes), TORCH_NCCL_ASYNC_ERROR_HANDLING=3 and the
# collective timeout (MEGAGPT_COLLECTIVE_TIMEOUT_S) unless they are already set, and
# exits with the training processes' own exit code.
set -euo pipefail

nproc="${1:-}"
if [[ "$nproc" =~ ^[0-9]+$ ]]; then
    shift
else
    nproc=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
nodes=()
if [[ -n "${NNODES:-}" ]]; then
    nodes=(--nnodes "$NNODES" --rdzv-endpoint "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=HOST:PORT of the first node}")
fi
exec python -m megagpt launch local --nproc "$nproc" "${nodes[@]}" "$@"

#!/usr/bin/env bash
# Train on one node with N processes:
#   launch/torchrun.sh 8 --config configs/gpt2-124m.yaml data.path=... data.tokenizer=...
# NPROC defaults to the number of GPUs (or 1 on a CPU-only machine). Extra arguments go
# to `megagpt train`. OMP_NUM_THREADS defaults to cores / processes; set it to override.
set -euo pipefail

nproc="${1:-}"
if [[ -z "$nproc" || "$nproc" == -* ]]; then
    nproc=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
else
    shift
fi
cores=$(nproc)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / nproc > 0 ? cores / nproc : 1 ))}"

# A free port chosen by the OS, so two jobs on one machine do not collide.
port=$(python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
exec python -m torch.distributed.run --nnodes=1 --nproc-per-node="$nproc" \
    --rdzv-backend=c10d --rdzv-endpoint="127.0.0.1:$port" \
    -m megagpt train "$@"

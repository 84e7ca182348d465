#!/usr/bin/env bash
# Launch tst-titan like torchtitan's run_train.sh:
#   NGPU=2 CONFIG_FILE=train_configs/tst_debug_cpu.toml scripts/train.sh [--overrides ...]
# NGPU is the number of processes (GPUs, or CPU processes on a machine without CUDA).
set -euo pipefail
NGPU=${NGPU:-2}
CONFIG_FILE=${CONFIG_FILE:-train_configs/tst_debug_cpu.toml}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-0}
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  # CPU: one intra-op thread per process keeps 2 processes from fighting over 2 cores.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
exec torchrun --nproc_per_node="${NGPU}" --rdzv_backend c10d --rdzv_endpoint="localhost:0" \
  --local-ranks-filter "${LOG_RANK:-0}" --role rank --tee 3 \
  -m tst_titan.train --job.config_file "${CONFIG_FILE}" "$@"

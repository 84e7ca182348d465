#!/usr/bin/env bash
# Launch tst-titan like torchtitan's run_train.sh:
#   NGPU=2 CONFIG_FILE=train_configs/tst_debug_cpu.toml scripts/train.sh [--overrides ...]
# NGPU is the number of processes per node (GPUs, or CPU processes on a machine without CUDA).
#
# Several nodes (c10d rendezvous, as torchtitan's multinode_trainer.slurm): run the same command
# on every node with
#   NNODES=<n> RDZV_ENDPOINT=<host>:<port> [RDZV_ID=<job id>] [NODE_RANK=<r>] scripts/train.sh ...
# RDZV_ENDPOINT is host:port of one of the nodes, a free port there (that node hosts the
# rendezvous store); torchrun numbers the global ranks. NODE_RANK, if given, only says which node
# hosts that store (NODE_RANK=0) rather than torch guessing it from the host name. NNODES unset
# or 1 is the single-node launch above, unchanged. DRY_RUN=1 prints the torchrun command instead
# of running it.
# scripts/multinode.slurm does all this under SLURM.
set -euo pipefail
NGPU=${NGPU:-2}
CONFIG_FILE=${CONFIG_FILE:-train_configs/tst_debug_cpu.toml}
NNODES=${NNODES:-1}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-0}

die() { echo "tst-titan: error: $*" >&2; exit 2; }
[[ $NNODES =~ ^[1-9][0-9]*$ ]] || die "NNODES must be a positive integer, got '${NNODES}'"
[[ $NGPU =~ ^[1-9][0-9]*$ ]] || die "NGPU must be a positive integer, got '${NGPU}'"

if (( NNODES == 1 )); then
  launch=(--nproc_per_node="${NGPU}" --rdzv_backend c10d --rdzv_endpoint="localhost:0")
else
  if [[ -n ${NODE_RANK:-} ]]; then
    [[ $NODE_RANK =~ ^[0-9]+$ ]] && (( 10#$NODE_RANK < NNODES )) \
      || die "NODE_RANK must be an integer in [0, NNODES=${NNODES}), got '${NODE_RANK}'"
  fi
  [[ -n ${RDZV_ENDPOINT:-} ]] || die "NNODES=${NNODES} needs RDZV_ENDPOINT=host:port (the c10d rendezvous, on one of the nodes)"
  [[ $RDZV_ENDPOINT =~ ^[^:]+:[0-9]+$ || $RDZV_ENDPOINT =~ ^\[.*\]:[0-9]+$ ]] \
    || die "RDZV_ENDPOINT must be host:port, got '${RDZV_ENDPOINT}'"
  launch=(--nnodes="${NNODES}" --nproc_per_node="${NGPU}"
    --rdzv_backend=c10d --rdzv_endpoint="${RDZV_ENDPOINT}" --rdzv_id="${RDZV_ID:-tst-titan}")
  if [[ -n ${NODE_RANK:-} ]]; then
    launch+=(--rdzv_conf="is_host=$(( 10#$NODE_RANK == 0 ))")
  fi
fi

cmd=(torchrun "${launch[@]}" --local-ranks-filter "${LOG_RANK:-0}" --role rank --tee 3
  -m tst_titan.train --job.config_file "${CONFIG_FILE}" "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q' "${cmd[0]}"; printf ' %q' "${cmd[@]:1}"; echo
  exit 0
fi
if [[ -z ${OMP_NUM_THREADS:-} ]] \
  && ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  # CPU: one intra-op thread per process keeps 2 processes from fighting over 2 cores.
  export OMP_NUM_THREADS=1
fi
exec "${cmd[@]}"

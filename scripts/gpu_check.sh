#!/usr/bin/env bash
# GPU check in one command (report: OUT_DIR/report.md; default outputs/gpu_check):
#
#   bash scripts/gpu_check.sh [OUT_DIR] [ARGS]   # GPU_CHECK_WORK=DIR: where runs go (default /tmp/gpu_check_*)
#
# ARGS go to scripts/gpu_check.py, e.g. `--only fused_fsdp_bf16,memory_plan` (the rows past
# the kit's 540 s deadline, in a second command).
#
# For a single-GPU machine without internet (the lent H200: Python 3.12, torch 2.11
# preinstalled). Missing packages come as wheels in .whl/, made beforehand where the
# package registry is reachable by `bash scripts/gpu_wheels.sh`. Then the project is
# installed against the machine's torch (no dependency resolution, no build isolation)
# and scripts/gpu_check.py (tst_titan/gpucheck) runs every row in its own process with a time budget.
# On a machine without CUDA the CUDA rows are reported "not run: no CUDA".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/gpu_check}
shift $(( $# > 0 ? 1 : 0 ))
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"

# 1. carried wheels, only when something the project imports is missing
# (find_spec only: importing torch here would cost seconds for nothing)
if ! $PY -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in
    ('torchtitan', 'torchdata', 'tyro', 'datasets', 'torchao')))" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
    echo "[gpu_check.sh] installing $(ls .whl/*.whl | wc -l) carried wheels into $SITE"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
      || { echo "[gpu_check.sh] wheel install failed" >&2; exit 3; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "[gpu_check.sh] missing packages and no .whl/: run 'bash scripts/gpu_wheels.sh' where PyPI is reachable" >&2
  fi
fi

# 2. the project itself, against the machine's torch (skipped when this checkout is already installed)
if ! $PY -c "import importlib.util as u, os, sys; s = u.find_spec('tst_titan')
sys.exit(0 if s and os.path.samefile(os.path.dirname(s.origin), 'tst_titan') else 1)" 2>/dev/null; then
  echo "[gpu_check.sh] installing tst-titan (editable, --no-deps)"
  $PY -m pip install -q --no-deps --no-build-isolation -e . \
    || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

exec $PY scripts/gpu_check.py --out "$OUT" ${GPU_CHECK_WORK:+--work "$GPU_CHECK_WORK"} "$@"

#!/usr/bin/env python
"""GPU check: every CUDA path of tst-titan on one GPU, in one command (tst_titan.gpucheck).

    bash scripts/gpu_check.sh [OUT_DIR] [--only ROW,ROW]   # installs what is missing, then runs this
    python scripts/gpu_check.py --out OUT_DIR [--only ROW,ROW] [--budget ROW=SECONDS]

The rows, their budgets and pass criteria: tst_titan/gpucheck/rows.py; the report:
OUT_DIR/report.md. Exit code 1 when a row that ran failed, 0 otherwise.
"""

import sys

try:
    from tst_titan.gpucheck.kit import main
except ImportError as e:  # the kit itself needs the project and torchtitan importable
    print(f"gpu_check.py: error: cannot import the kit ({type(e).__name__}: {e}); run "
          "'bash scripts/gpu_check.sh', which installs the carried wheels and the project", file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Export a tst-titan DCP checkpoint as a Hugging Face model directory.

    python scripts/export_hf.py --config train_configs/tst_debug_cpu.toml \\
        --checkpoint outputs/tst_debug_cpu/checkpoint/step-300 --out outputs/tst_debug_cpu/hf

Writes config.json, model.safetensors, generation_config.json and the tokenizer files;
``transformers.AutoModelForCausalLM.from_pretrained(OUT)`` loads the result. ``--config``
is the run's TOML (model, flavor, tokenizer, TST plan); extra torchtitan overrides may
follow ``--``. A checkpoint from the superposition phase is refused unless ``--force``.
See tst_titan/export.py.
"""

from __future__ import annotations

import argparse
import sys

from tst_titan.errors import USER_ERRORS
from tst_titan.export import export_hf, load_checkpoint_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="the run's TOML file")
    ap.add_argument("--checkpoint", required=True, help="a DCP folder <dump>/checkpoint/step-N")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--force", action="store_true", help="export a phase-1 (superposition) checkpoint anyway")
    ap.add_argument("overrides", nargs="*", help="torchtitan CLI overrides, after --")
    args = ap.parse_args(argv)
    try:
        loaded = load_checkpoint_model(args.config, args.checkpoint, args.overrides)
        out = export_hf(loaded, args.out, dtype=args.dtype, force=args.force)
    except USER_ERRORS as e:
        print(f"export_hf: error: {e}", file=sys.stderr)
        return 2
    params = sum(p.numel() for p in loaded.model.parameters())
    print(f"exported step {loaded.step} ({loaded.job_config.model.name} {loaded.job_config.model.flavor}, "
          f"{params:,} parameters, {args.dtype}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Tokenize a dataset once into a token store that training reads at GPU speed.

    python scripts/prepare_data.py --source embedded --tokenizer embedded --out data/embedded-train
    python scripts/prepare_data.py --source local --path 'corpus/*.jsonl' \\
        --tokenizer ./assets/tokenizer/llama3 --out data/corpus-train
    python scripts/prepare_data.py --source hf --path mlfoundations/dclm-baseline-1.0 \\
        --tokenizer ./assets/tokenizer/llama3 --out /data/dclm-train

then train with ``--training.dataset store --training.dataset_path <out>`` and the same
tokenizer (``model.hf_assets_path``); a store made with another tokenizer is refused.
``--split validation`` prepares a held-out store for ``[validation]``.

Tokenization runs on all cores (``tokenizers``' batch encoding; ``--threads`` caps
it). The store is written shard by shard and its manifest last: an interrupted run
leaves no store that looks complete, and running the same command again continues
from the last finished shard (a finished store is a no-op). See tst_titan/data/store.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="embedded | python_env | local | hf")
    p.add_argument("--path", help="local: file, directory or glob; hf: hub dataset name")
    p.add_argument("--split", default="train", choices=["train", "validation"])
    p.add_argument("--tokenizer", default="embedded",
                   help="the run's model.hf_assets_path: a directory with tokenizer.json, or 'embedded'")
    p.add_argument("--vocab-size", type=int, default=2048,
                   help="data.embedded_vocab_size, for --tokenizer embedded")
    p.add_argument("--text-field", default="text", help="data.text_field (jsonl / parquet / hub)")
    p.add_argument("--hf-config", default="", help="data.hf_config (hub)")
    p.add_argument("--hf-split", default="train", help="data.hf_split (hub, --split train)")
    p.add_argument("--hf-validation-split", default="validation", help="data.hf_validation_split")
    p.add_argument("--packages", nargs="+", default=None,
                   help="python_env: the standard library and only these installed packages "
                        "(a corpus that other installs do not change)")
    p.add_argument("--out", required=True, help="the store directory to write")
    p.add_argument("--docs-per-shard", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="tokenizer threads (default: all cores)")
    args = p.parse_args(argv)
    if args.threads:
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    from tst_titan.config import Data
    from tst_titan.errors import DataError
    from tst_titan.data.store import DOCS_PER_SHARD, prepare_store, source_texts
    from tst_titan.data.tokenizer import resolve_tokenizer_path

    data_cfg = Data(
        text_field=args.text_field, hf_config=args.hf_config, hf_split=args.hf_split,
        hf_validation_split=args.hf_validation_split, embedded_vocab_size=args.vocab_size,
    )
    try:
        tok_dir = resolve_tokenizer_path(args.tokenizer, args.vocab_size)
        if not (Path(tok_dir) / "tokenizer.json").is_file():
            raise DataError(f"--tokenizer: no tokenizer.json in {tok_dir!r}")
        tokenizer = HuggingFaceTokenizer(tok_dir)
        source = source_texts(args.source, args.path, args.split, data_cfg, packages=args.packages)
        prepare_store(source, tokenizer, tok_dir, args.out,
                      docs_per_shard=args.docs_per_shard or DOCS_PER_SHARD)
    except DataError as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

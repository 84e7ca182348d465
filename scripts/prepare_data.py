#!/usr/bin/env python
"""Tokenize a dataset once into a token store that training reads at GPU speed.

    python scripts/prepare_data.py --source embedded --tokenizer embedded --out data/embedded-train
    python scripts/prepare_data.py --source local --path 'corpus/*.jsonl' \\
        --tokenizer ./assets/tokenizer/llama3 --out data/corpus-train
    # DCLM has one split: carve a held-out set by document hash, cap the training store
    python scripts/prepare_data.py --source hf --path mlfoundations/dclm-baseline-1.0 \\
        --holdout-every 100 --split train --max-tokens 110B \\
        --tokenizer ./assets/tokenizer/llama3 --out /data/dclm-llama3-train
    python scripts/prepare_data.py --source hf --path mlfoundations/dclm-baseline-1.0 \\
        --holdout-every 100 --split validation --max-tokens 50M \\
        --tokenizer ./assets/tokenizer/llama3 --out /data/dclm-llama3-val

then train with ``--training.dataset store --training.dataset_path <out>`` and the same
tokenizer (``model.hf_assets_path``); a store made with another tokenizer is refused.
``--split validation`` prepares a held-out store for ``[validation]``.

The source is tokenized in pieces (``--docs-per-shard`` documents, or one file of a hub
dataset), ``--processes`` at a time (default: all cores). A finished piece is never
redone: running the same command again after an interruption continues with the
unfinished pieces, and a finished store is a no-op. Several machines: give each
``--shard i --num-shards K`` (one SLURM array task each) and the same ``--out`` on a
shared file system; the last part to finish writes the manifest, or run
``--merge --num-shards K --out <out>``. See tst_titan/data/prepare.py.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from torchtitan.components.tokenizer import HuggingFaceTokenizer

from tst_titan.config import Data
from tst_titan.data.prepare import DOCS_PER_SHARD, Holdout, merge_parts, prepare_store
from tst_titan.data.sources import KINDS, source_texts
from tst_titan.data.tokenizer import resolve_tokenizer_path
from tst_titan.errors import DataError

TEXT_KINDS = [k for k, kind in KINDS.items() if kind.text]
_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def token_count(text: str) -> int:
    """``110B``, ``50M``, ``1.5e9`` or ``1000000``: a number of tokens."""
    m = re.fullmatch(r"\s*([0-9._]+(?:e[0-9]+)?)\s*([KMBGT]?)\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 110B, 50M, 1e9)")
    return int(float(m.group(1).replace("_", "")) * _SUFFIX[m.group(2).upper()])


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", choices=TEXT_KINDS, help=" | ".join(TEXT_KINDS))
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
    p.add_argument("--max-tokens", type=token_count, default=None,
                   help="stop at about this many tokens (e.g. 110B, 50M): each part keeps its pieces "
                        "in order until it holds its share, cut after the document that reaches it")
    p.add_argument("--holdout-every", type=int, default=None, metavar="N",
                   help="carve a held-out set from a source without one: a document is held out iff "
                        "a hash of its text is divisible by N; --split validation keeps those, "
                        "--split train the others (the same N for both: disjoint by construction)")
    p.add_argument("--processes", type=int, default=None,
                   help=f"worker processes tokenizing pieces side by side (default: all cores, {cores()})")
    p.add_argument("--threads", type=int, default=None,
                   help="tokenizer threads per process (default: cores / processes)")
    p.add_argument("--num-shards", type=int, default=1, metavar="K",
                   help="split the preparation into K parts (piece k goes to part k %% K)")
    p.add_argument("--shard", type=int, default=None, metavar="I",
                   help="prepare part I of --num-shards only (one machine or SLURM array task each)")
    p.add_argument("--merge", action="store_true",
                   help="write the manifest of a store whose --num-shards parts are all finished")
    p.add_argument("--docs-per-shard", type=int, default=None,
                   help=f"documents per piece of a map-style source (default {DOCS_PER_SHARD:,})")
    args = p.parse_args(argv)
    if not args.merge and not args.source:
        p.error("--source is required (unless --merge)")
    if args.holdout_every is not None and args.holdout_every < 2:
        p.error("--holdout-every: must be at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    data_cfg = Data(
        text_field=args.text_field, hf_config=args.hf_config, hf_split=args.hf_split,
        hf_validation_split=args.hf_validation_split, embedded_vocab_size=args.vocab_size,
    )
    processes = args.processes or cores()
    try:
        if args.merge:
            merge_parts(args.out, args.num_shards)
            return 0
        tok_dir = resolve_tokenizer_path(args.tokenizer, args.vocab_size)
        if not (Path(tok_dir) / "tokenizer.json").is_file():
            raise DataError(f"--tokenizer: no tokenizer.json in {tok_dir!r}")
        tokenizer = HuggingFaceTokenizer(tok_dir)
        # A carved held-out set comes out of the training split; --split picks the side.
        split = "train" if args.holdout_every else args.split
        holdout = Holdout(args.holdout_every, args.split) if args.holdout_every else None
        source = source_texts(args.source, args.path, split, data_cfg, packages=args.packages,
                              num_proc=processes)
        prepare_store(source, tokenizer, tok_dir, args.out, docs_per_shard=args.docs_per_shard or DOCS_PER_SHARD,
                      max_tokens=args.max_tokens, holdout=holdout, num_parts=args.num_shards, part=args.shard,
                      processes=processes, threads=args.threads)
    except DataError as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

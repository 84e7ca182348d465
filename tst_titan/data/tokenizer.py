"""Tokenizers: any Hugging Face ``tokenizer.json``, or a BPE trained on the embedded corpus.

``model.hf_assets_path`` is either a directory holding ``tokenizer.json`` (plus
optionally ``tokenizer_config.json``), loaded by torchtitan's ``HuggingFaceTokenizer``,
or the word ``embedded``: a byte-level BPE of ``data.embedded_vocab_size`` tokens is
trained on the embedded corpus's training split with ``tokenizers`` (a few seconds)
and cached under ``$TST_TITAN_CACHE`` (default ``~/.cache/tst_titan``), keyed by the
corpus and the vocabulary size, so every rank and every later run loads the same file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from torchtitan.components.tokenizer import HuggingFaceTokenizer

from tst_titan.data import embedded
from tst_titan.errors import ConfigError

EMBEDDED = "embedded"
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def cache_dir() -> Path:
    return Path(os.environ.get("TST_TITAN_CACHE", Path.home() / ".cache" / "tst_titan"))


def _train_embedded_tokenizer(out_dir: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    paths = embedded.document_paths("train")
    tok.train_from_iterator((embedded.read_document(p) for p in paths), trainer=trainer)
    # Write to a temporary directory, then rename: concurrent ranks never see half a file.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=out_dir.name + ".tmp"))
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "add_bos_token": True})
    )
    try:
        os.rename(tmp, out_dir)
    except OSError:  # another process won the race; theirs is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def embedded_tokenizer_dir(vocab_size: int) -> Path:
    """Directory of the cached embedded-corpus tokenizer, training it on first use."""
    out = cache_dir() / f"tokenizer-{embedded.corpus_fingerprint()}-v{vocab_size}"
    if not (out / "tokenizer.json").exists():
        _train_embedded_tokenizer(out, vocab_size)
    return out


def resolve_tokenizer_path(hf_assets_path: str, embedded_vocab_size: int) -> str:
    if hf_assets_path == EMBEDDED:
        return str(embedded_tokenizer_dir(embedded_vocab_size))
    return hf_assets_path


def build_tokenizer(job_config) -> HuggingFaceTokenizer:
    """TrainSpec ``build_tokenizer_fn``."""
    path = resolve_tokenizer_path(
        job_config.model.hf_assets_path, job_config.data.embedded_vocab_size
    )
    if not (Path(path) / "tokenizer.json").is_file():
        raise ConfigError(
            f"model.hf_assets_path: no tokenizer.json in {path!r} "
            "(give a directory with a Hugging Face tokenizer.json, or 'embedded')"
        )
    return HuggingFaceTokenizer(path)

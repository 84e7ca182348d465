"""TrainSpecs ``tst_llama3`` and ``tst_qwen3``: torchtitan's models, TST hooks plugged in.

Each spec is torchtitan's own spec (model family, parallelize function, optimizer,
LR schedule, state-dict adapter) with five pieces replaced: the model class (bag
embedding), the loss (multi-hot CE in phase 1), the dataloader (phase-aware packing),
the tokenizer (HF tokenizer.json or the embedded BPE), the validator (our held-out
data) and the metrics processor (phase-aware). Flavors add the paper's shapes and
tiny debug models to torchtitan's own.
"""

from __future__ import annotations

import dataclasses

from torchtitan.models.llama3 import TransformerModelArgs
from torchtitan.models.moe import MoEArgs
from torchtitan.models.qwen3 import Qwen3ModelArgs
from torchtitan.protocols.train_spec import get_train_spec, register_train_spec

from tst_titan.data.loader import build_tst_dataloader
from tst_titan.data.tokenizer import build_tokenizer
from tst_titan.loss import build_tst_loss
from tst_titan.metrics import build_tst_metrics_processor
from tst_titan.model import TSTLlama3, TSTQwen3
from tst_titan.parallelize import parallelize_tst_llama3, parallelize_tst_qwen3
from tst_titan.validate import build_tst_validator

LLAMA3_VOCAB = 128256  # the paper used the Llama-3 tokenizer, untied embeddings

# The paper's dense shapes (our reading of "270M / 600M / 3B", total parameters with
# the Llama-3 vocabulary and untied embeddings), plus debug models for CPU.
tst_llama3_flavors: dict[str, TransformerModelArgs] = {
    "tiny": TransformerModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=2048, rope_theta=500000),
    "debug": TransformerModelArgs(dim=256, n_layers=6, n_heads=16, vocab_size=2048, rope_theta=500000),
    # The data-rich CPU study (train_configs/study_cpu.toml): a small model trained long.
    "study": TransformerModelArgs(
        dim=128, n_layers=4, n_heads=4, vocab_size=2048, multiple_of=128, rope_theta=500000,
    ),  # 1.38M total (FFN hidden 384), 1.11M without the input embedding
    # Its second size: 4x fewer non-embedding parameters (0.21M vs 0.85M; 0.48M total).
    "study_small": TransformerModelArgs(
        dim=64, n_layers=4, n_heads=4, vocab_size=2048, multiple_of=64, rope_theta=500000,
    ),
    "270M": TransformerModelArgs(
        dim=768, n_layers=12, n_heads=12, n_kv_heads=4, vocab_size=LLAMA3_VOCAB,
        multiple_of=256, rope_theta=500000,
    ),  # 272.5M total, 174.0M without the input embedding
    "600M": TransformerModelArgs(
        dim=1280, n_layers=16, n_heads=20, n_kv_heads=4, vocab_size=LLAMA3_VOCAB,
        multiple_of=256, rope_theta=500000,
    ),  # 611.5M total
    "3B": TransformerModelArgs(
        dim=3072, n_layers=24, n_heads=24, n_kv_heads=8, vocab_size=LLAMA3_VOCAB,
        multiple_of=256, rope_theta=500000,
    ),  # 3.20B total (3,204,074,496)
}


def _qwen3_moe(**kw) -> MoEArgs:
    base = dict(num_shared_experts=0, score_func="softmax", route_norm=True,
                route_scale=1.0, score_before_experts=False)
    base.update(kw)
    return MoEArgs(**base)


tst_qwen3_flavors: dict[str, Qwen3ModelArgs] = {
    "tiny": Qwen3ModelArgs(
        vocab_size=2048, max_seq_len=4096, head_dim=16, dim=64, n_layers=2, n_heads=4,
        n_kv_heads=2, qk_norm=True, hidden_dim=192, rope_theta=1000000,
        # untied, like the paper; torchtitan 0.2.2's qwen3 FSDP wrapping (llama4's
        # apply_fsdp: embedding and output in separate groups) rejects tied weights.
    ),
    "tiny_moe": Qwen3ModelArgs(
        vocab_size=2048, max_seq_len=4096, head_dim=16, dim=64, n_layers=2, n_heads=4,
        n_kv_heads=2, qk_norm=True, hidden_dim=192, rope_theta=1000000,
        moe_enabled=True, moe_inter_dim=64,
        moe_args=_qwen3_moe(num_experts=8, top_k=2, use_grouped_mm=False),
    ),
    # Qwen3-like MoE of the paper's 10B-A1B run: 10.1B total, ~1.3B active per token.
    "10B-A1B": Qwen3ModelArgs(
        vocab_size=LLAMA3_VOCAB, max_seq_len=4096, head_dim=128, dim=1536, n_layers=24,
        n_heads=16, n_kv_heads=4, qk_norm=True, hidden_dim=4096, rope_theta=1000000,
        moe_enabled=True, moe_inter_dim=768,
        moe_args=_qwen3_moe(num_experts=112, top_k=8),
    ),
}


def _tst_spec(base_name: str, model_cls, flavors, parallelize_fn):
    base = get_train_spec(base_name)
    return dataclasses.replace(
        base,
        model_cls=model_cls,
        model_args={**base.model_args, **flavors},
        parallelize_fn=parallelize_fn,
        pipelining_fn=None,  # refused with TST: stage input shapes change at the switch
        build_dataloader_fn=build_tst_dataloader,
        build_tokenizer_fn=build_tokenizer,
        build_loss_fn=build_tst_loss,
        build_validator_fn=build_tst_validator,
        build_metrics_processor_fn=build_tst_metrics_processor,
    )


SPEC_NAMES = ("tst_llama3", "tst_qwen3")
_registered = False


def register_specs() -> None:
    """Register ``tst_llama3`` and ``tst_qwen3`` once per process."""
    global _registered
    if _registered:
        return
    register_train_spec(
        "tst_llama3", _tst_spec("llama3", TSTLlama3, tst_llama3_flavors, parallelize_tst_llama3)
    )
    register_train_spec(
        "tst_qwen3", _tst_spec("qwen3", TSTQwen3, tst_qwen3_flavors, parallelize_tst_qwen3)
    )
    _registered = True

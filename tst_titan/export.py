"""From a DCP checkpoint to an ordinary Hugging Face model directory.

A TST-trained model is a plain causal LM (the bag embedding adds no parameter), so the
export is torchtitan's own state-dict adapter (``to_hf``: key names, RoPE permutation,
expert split) plus a ``config.json`` for transformers' ``LlamaForCausalLM``,
``Qwen3ForCausalLM`` or ``Qwen3MoeForCausalLM``, ``model.safetensors`` and the
tokenizer files. Used by ``scripts/export_hf.py`` and ``scripts/eval_ppl.py``.

A checkpoint from the superposition phase (step <= the switch step) has never been
trained on next-token prediction; it is refused unless ``force=True``.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torchtitan.protocols.train_spec import get_train_spec

from tst_titan.checkpoint import check_model_shapes
from tst_titan.data.tokenizer import resolve_tokenizer_path
from tst_titan.errors import CheckpointError, ConfigError, ExportError
from tst_titan.schedule import plan_from_job_config
from tst_titan.specs import register_specs
from tst_titan.train import parse_config


@dataclass
class LoadedCheckpoint:
    job_config: Any
    model: torch.nn.Module  # torchtitan model (with the bag embedding), fp32, eval mode, CPU
    model_args: Any
    spec: Any
    step: int
    switch_step: int
    tokenizer_dir: str
    checkpoint: str


def checkpoint_step(checkpoint: str | Path) -> int:
    m = re.fullmatch(r"step-(\d+)", Path(checkpoint).name)
    if m is None:
        raise CheckpointError(f"{checkpoint}: expected a checkpoint folder named step-<N>")
    return int(m.group(1))


def model_source_error(checkpoint: str | None, hf: str | None, config: str | None) -> str | None:
    """Why a command line's model source is unusable, or None: exactly one of
    ``--checkpoint`` and ``--hf``, and a checkpoint needs its run's ``--config``."""
    if bool(checkpoint) == bool(hf):
        return "give exactly one of --checkpoint and --hf"
    if checkpoint and not config:
        return "--checkpoint needs --config (the run's TOML)"
    return None


def load_checkpoint_model(config_file: str, checkpoint: str, overrides: list[str] | None = None) -> LoadedCheckpoint:
    """The run's model, built from its TOML (plus overrides), with the checkpoint's weights."""
    cfg = parse_config(["--job.config_file", str(config_file), *(overrides or [])])
    register_specs()
    spec = get_train_spec(cfg.model.name)
    if cfg.model.flavor not in spec.model_args:
        raise ConfigError(f"model.flavor: {cfg.model.flavor!r} is not a flavor of {cfg.model.name}")
    ckpt = Path(checkpoint)
    if not (ckpt / ".metadata").is_file():
        raise CheckpointError(f"{ckpt}: not a complete DCP checkpoint (no .metadata)")
    step = checkpoint_step(ckpt)

    model_args = copy.deepcopy(spec.model_args[cfg.model.flavor])
    model_args.update_from_config(cfg)
    with torch.device("cpu"):
        model = spec.model_cls(model_args)
    state = dict(model.state_dict())
    check_model_shapes(state, str(ckpt))
    dcp.load(state, checkpoint_id=str(ckpt))
    model.load_state_dict(state)
    model = model.float().eval()
    plan = plan_from_job_config(cfg)
    tok_dir = resolve_tokenizer_path(cfg.model.hf_assets_path, cfg.data.embedded_vocab_size)
    return LoadedCheckpoint(cfg, model, model_args, spec, step, plan.switch_step, tok_dir, str(ckpt))


def hf_config(loaded: LoadedCheckpoint, state: dict[str, torch.Tensor], bos_id, eos_id, dtype: str) -> dict:
    """transformers ``config.json`` of the same network."""
    a, name = loaded.model_args, loaded.job_config.model.name
    common = {
        "vocab_size": a.vocab_size,
        "num_hidden_layers": a.n_layers,
        "num_attention_heads": a.n_heads,
        "hidden_act": "silu",
        "attention_bias": False,
        "max_position_embeddings": a.max_seq_len,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": dtype,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if name == "tst_llama3":
        sc = a.rope_scaling_args
        return {
            **common,
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": a.dim,
            "intermediate_size": int(state["layers.0.feed_forward.w1.weight"].shape[0]),
            "num_key_value_heads": a.n_kv_heads or a.n_heads,
            "head_dim": a.dim // a.n_heads,
            "rms_norm_eps": a.norm_eps,
            "rope_theta": a.rope_theta,
            # torchtitan's llama3 always applies Llama-3.1 RoPE scaling.
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": sc.scaling_factor,
                "low_freq_factor": sc.low_freq_factor,
                "high_freq_factor": sc.high_freq_factor,
                "original_max_position_embeddings": sc.original_max_position_embeddings,
            },
            # RoPE is valid beyond the training length; transformers wants at least this.
            "max_position_embeddings": max(a.max_seq_len, sc.original_max_position_embeddings),
            "tie_word_embeddings": False,
            "mlp_bias": False,
            "pretraining_tp": 1,
        }
    if name == "tst_qwen3":
        cfg = {
            **common,
            "hidden_size": a.dim,
            "intermediate_size": a.hidden_dim,
            "num_key_value_heads": a.n_kv_heads,
            "head_dim": a.head_dim,
            "rms_norm_eps": a.norm_eps,
            "rope_theta": a.rope_theta,
            "tie_word_embeddings": bool(a.enable_weight_tying),
            "use_sliding_window": False,
            "sliding_window": None,
        }
        if not a.qk_norm:
            raise ExportError("qwen3 without qk_norm has no transformers counterpart")
        if not a.moe_enabled:
            return {**cfg, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}
        m = a.moe_args
        if m.num_shared_experts or m.score_func != "softmax" or m.route_scale != 1.0 or m.score_before_experts:
            raise ExportError(
                "this MoE routing (shared experts, sigmoid scores, route_scale or scores before "
                "experts) has no Qwen3MoeForCausalLM counterpart"
            )
        return {
            **cfg,
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "moe_intermediate_size": a.moe_inter_dim,
            "num_experts": m.num_experts,
            "num_experts_per_tok": m.top_k,
            "norm_topk_prob": bool(m.route_norm),
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "output_router_logits": False,
        }
    raise ExportError(f"model.name {name!r}: export supports tst_llama3 and tst_qwen3")


def _copy_tokenizer(tokenizer_dir: str, out: Path, bos: str | None, eos: str | None) -> None:
    """Tokenizer files; a tokenizer.json without a post-processor gets one that adds BOS,
    as training did (torchtitan adds it itself), so transformers' tokenizer agrees."""
    from tokenizers import Tokenizer, processors

    src = Path(tokenizer_dir)
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    if tok.post_processor is None and bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
        tok.save(str(out / "tokenizer.json"))
    else:
        shutil.copy(src / "tokenizer.json", out / "tokenizer.json")
    for extra in ("special_tokens_map.json", "generation_config.json"):
        if (src / extra).is_file():
            shutil.copy(src / extra, out / extra)
    tcfg = {}
    if (src / "tokenizer_config.json").is_file():
        tcfg = json.loads((src / "tokenizer_config.json").read_text())
    tcfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    if bos:
        tcfg.setdefault("bos_token", bos)
    if eos:
        tcfg.setdefault("eos_token", eos)
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))


def export_hf(loaded: LoadedCheckpoint, out_dir: str | Path, dtype: str = "float32", force: bool = False) -> Path:
    """Write ``out_dir`` with config.json, model.safetensors and the tokenizer files."""
    from safetensors.torch import save_file
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    if loaded.step <= loaded.switch_step and not force:
        raise ExportError(
            f"checkpoint step {loaded.step} is in the superposition phase (steps 1-{loaded.switch_step}): "
            "the model has not been trained on next-token prediction yet; export a checkpoint taken "
            "after the switch, or pass --force"
        )
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    state = {k: v.detach() for k, v in loaded.model.state_dict().items()}
    adapter = loaded.spec.state_dict_adapter(loaded.model_args, None)
    hf_state = {k: v.to(torch_dtype).contiguous().clone() for k, v in adapter.to_hf(state).items()}
    tok = HuggingFaceTokenizer(loaded.tokenizer_dir)
    bos_id, eos_id = getattr(tok, "bos_id", None), getattr(tok, "eos_id", None)
    config = hf_config(loaded, state, bos_id, eos_id, dtype)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    gen = {"bos_token_id": bos_id, "eos_token_id": eos_id, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    _copy_tokenizer(
        loaded.tokenizer_dir, out,
        tok.id_to_token(bos_id) if bos_id is not None else None,
        tok.id_to_token(eos_id) if eos_id is not None else None,
    )
    (out / "tst_export.json").write_text(json.dumps({
        "source_checkpoint": loaded.checkpoint,
        "step": loaded.step, "switch_step": loaded.switch_step,
        "model": loaded.job_config.model.name, "flavor": loaded.job_config.model.flavor,
        "seq_len": loaded.job_config.training.seq_len,  # the trained context (scripts/eval_lm.py)
    }, indent=2))
    return out

"""Config checks that run before any work: every error is one line naming the key."""

from __future__ import annotations

from pathlib import Path

from tst_titan.data.sources import KINDS, SourceSpec, check_source
from tst_titan.data.store import TokenStore
from tst_titan.data.tokenizer import resolve_tokenizer_path
from tst_titan.errors import ConfigError, DataError
from tst_titan.schedule import AT_SWITCH, MODES, WEIGHTINGS


def _check_dataset(kind: str, path: str | None, prefix: str) -> None:
    """The registry's cheap checks of a section's source (kind, path, files, packages)."""
    try:
        check_source(SourceSpec.from_config(kind, path, prefix=prefix))
    except DataError as e:
        raise ConfigError(str(e)) from None


def _check_workers(kind: str, dl_cfg, prefix: str) -> None:
    if dl_cfg.num_workers < 0:
        raise ConfigError(f"{prefix}.dataloader.num_workers: must be >= 0, got {dl_cfg.num_workers}")
    if kind in KINDS and KINDS[kind].in_process_only and dl_cfg.num_workers > 0:
        raise ConfigError(
            f"{prefix}.dataloader.num_workers: a streamed hub dataset ({prefix}.dataset = {kind!r}) "
            "is read in the training process (the datasets library would split its shards "
            "among workers); set it to 0, or prepare a token store with "
            "scripts/prepare_data.py and use dataset = 'store'"
        )


def _check_stores(job_config) -> None:
    """Token stores: complete, undamaged and made with this run's tokenizer. Reads the
    manifest and file sizes only: cheap, and before any distributed work."""

    sections = [("training", job_config.training)]
    if job_config.validation.enable:
        sections.append(("validation", job_config.validation))
    for prefix, sec in sections:
        if sec.dataset != "store":
            continue
        try:
            store = TokenStore(sec.dataset_path, f"{prefix}.dataset_path")
            m = job_config.model
            store.check_tokenizer(resolve_tokenizer_path(m.hf_assets_path, job_config.data.embedded_vocab_size))
        except DataError as e:
            raise ConfigError(str(e)) from None


def check_tst(job_config) -> None:
    tst, steps = job_config.tst, job_config.training.steps
    if not isinstance(tst.bag_size, int) or isinstance(tst.bag_size, bool) or tst.bag_size < 1:
        raise ConfigError(f"tst.bag_size: must be an integer >= 1, got {tst.bag_size!r}")
    if tst.mode not in MODES:
        raise ConfigError(f"tst.mode: must be one of {list(MODES)}, got {tst.mode!r}")
    if tst.bag_weighting not in WEIGHTINGS:
        raise ConfigError(
            f"tst.bag_weighting: must be one of {list(WEIGHTINGS)}, got {tst.bag_weighting!r}"
        )
    if tst.at_switch not in AT_SWITCH:
        raise ConfigError(f"tst.at_switch: must be one of {list(AT_SWITCH)}, got {tst.at_switch!r}")
    if tst.superposition_ratio is not None and tst.switch_step is not None:
        raise ConfigError(
            "tst.switch_step: give either tst.superposition_ratio or tst.switch_step, not both"
        )
    r = tst.superposition_ratio
    if r is not None and not (0.0 <= float(r) < 1.0):
        raise ConfigError(f"tst.superposition_ratio: must be in [0, 1), got {r!r}")
    k = tst.switch_step
    if k is not None and not (0 <= int(k) < steps):
        raise ConfigError(
            f"tst.switch_step: must be in [0, training.steps={steps}), got {k!r} "
            "(a run that never switches does not recover)"
        )
    par = job_config.parallelism
    _check_fused_loss(tst, par)
    if not tst.enable:
        return
    if par.pipeline_parallel_degree > 1:
        raise ConfigError(
            "parallelism.pipeline_parallel_degree: pipeline parallel is not supported with "
            "TST (the first stage's input shape changes at the switch); set it to 1"
        )
    if par.expert_parallel_degree > 1:
        raise ConfigError(
            "parallelism.expert_parallel_degree: expert parallel is not yet validated with "
            "TST; set it to 1 (experts are still sharded by FSDP)"
        )


def _check_fused_loss(tst, par) -> None:
    if not tst.fused_loss:
        return
    c = tst.fused_loss_chunk_size
    if not isinstance(c, int) or isinstance(c, bool) or c < 1:
        raise ConfigError(f"tst.fused_loss_chunk_size: must be an integer >= 1, got {c!r}")
    if par.tensor_parallel_degree > 1:
        raise ConfigError(
            "tst.fused_loss: not supported with tensor parallel (parallelism."
            "tensor_parallel_degree > 1: no vocab-parallel fused head yet); set it to false "
            "to use loss_parallel"
        )
    if par.pipeline_parallel_degree > 1:
        raise ConfigError("tst.fused_loss: not supported with pipeline parallel; set it to false")


def check_job_config(job_config, train_spec=None) -> None:
    """Raise :class:`ConfigError` for the first invalid value, before distributed init."""
    check_tst(job_config)
    m = job_config.model
    if train_spec is not None and m.flavor not in train_spec.model_args:
        raise ConfigError(
            f"model.flavor: unknown flavor {m.flavor!r} for {m.name} "
            f"(choose from {sorted(train_spec.model_args)})"
        )
    t = job_config.training
    if t.seq_len < 1 or t.local_batch_size < 1 or t.steps < 1:
        raise ConfigError("training: seq_len, local_batch_size and steps must be >= 1")
    _check_dataset(t.dataset, t.dataset_path, "training")
    _check_workers(t.dataset, t.dataloader, "training")
    if job_config.validation.enable:
        v = job_config.validation
        _check_dataset(v.dataset, v.dataset_path, "validation")
        _check_workers(v.dataset, v.dataloader, "validation")
    if m.hf_assets_path != "embedded":
        if not (Path(m.hf_assets_path) / "tokenizer.json").is_file():
            raise ConfigError(
                f"model.hf_assets_path: no tokenizer.json in {m.hf_assets_path!r} "
                "(give a directory with a Hugging Face tokenizer.json, or 'embedded')"
            )
    elif train_spec is not None:
        vocab = train_spec.model_args[m.flavor].vocab_size
        if job_config.data.embedded_vocab_size > vocab:
            raise ConfigError(
                f"data.embedded_vocab_size: {job_config.data.embedded_vocab_size} exceeds the "
                f"model's vocab_size {vocab} ({m.name} {m.flavor})"
            )
    _check_stores(job_config)
    attn = getattr(train_spec.model_args[m.flavor], "attn_type", "sdpa") if train_spec else "sdpa"
    if job_config.tst.enable and attn != "sdpa":
        raise ConfigError(
            f"model.flavor: {m.flavor!r} uses {attn} attention with document masks, which "
            "is not defined for bags; use an sdpa flavor with TST"
        )


def check_tokenizer_fits(tokenizer, model_args, flavor: str) -> None:
    """A tokenizer whose ids exceed the embedding table would fail mid-step on GPU."""
    n = tokenizer.get_vocab_size()
    if n > model_args.vocab_size:
        raise ConfigError(
            f"model.hf_assets_path: tokenizer has {n} tokens but flavor {flavor!r} has "
            f"vocab_size {model_args.vocab_size}"
        )

"""Downstream evaluation with EleutherAI's lm-evaluation-harness (lm-eval 0.4.x).

The paper reports zero-shot accuracy on ARC-Easy, ARC-Challenge, BoolQ, HellaSwag,
OpenBookQA, PIQA and WinoGrande (MMLU optionally); lm-eval scores a Hugging Face
folder written by :mod:`tst_titan.export`. Two tasks ship with the package
(``tst_titan/lm_eval_tasks``) so the path runs offline: ``tst_heldout`` (rolling
log-likelihood of held-out chunks of the embedded corpus) and ``tst_tiny_mc``.

BOS as in training: every training document starts with BOS, and the export's
tokenizer adds it, so multiple-choice contexts get it (``add_bos_token=True``). In
rolling log-likelihood lm-eval puts BOS before the first window itself; the
tokenizer's BOS would then be scored as a token (lm-eval issue #3333), so
:class:`TSTHFLM` encodes those documents without special tokens.

Task data come from the hub (or its cache) except for the local tasks. Every task is
loaded before any model work; one that cannot get its data stops the run with one line
that names it (:class:`~tst_titan.errors.EvalError`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable, make_table

from tst_titan.data import embedded
from tst_titan.errors import CheckpointError, EvalError, one_line_reason
from tst_titan.export import export_hf, load_checkpoint_model

PAPER_TASKS = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande")
LOCAL_TASKS = ("tst_heldout", "tst_tiny_mc")
TASK_SETS = {"paper": PAPER_TASKS, "local": LOCAL_TASKS}
TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
RESULTS_DIR = "lm_eval"  # <run>/lm_eval/results.json, read by scripts/compare_runs.py
RESULTS_FILE = "results.json"


@dataclass
class Settings:
    device: str
    batch_size: int | str
    dtype: str
    max_length: int


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def settings_for(
    max_length: int, device: str | None = None, batch_size: int | str | None = None, dtype: str | None = None
) -> Settings:
    """cuda when there is one: lm-eval's automatic batch size and bfloat16 there;
    on CPU a fixed batch of 8 (automatic sizing probes by running out of memory)
    and float32."""
    device = device or default_device()
    on_gpu = device.startswith("cuda")
    if batch_size is None:
        batch_size = "auto" if on_gpu else 8
    return Settings(device, batch_size, dtype or ("bfloat16" if on_gpu else "float32"), max_length)


def expand_tasks(names: list[str], mmlu: bool = False) -> list[str]:
    """Task names with the sets ``paper`` and ``local`` spelled out, duplicates dropped."""
    out: list[str] = []
    for name in names:
        for t in TASK_SETS.get(name, (name,)):
            if t not in out:
                out.append(t)
    if mmlu and "mmlu" not in out:
        out.append("mmlu")
    return out


def task_manager(tasks: list[str], include_paths: list[str] | None = None) -> TaskManager:
    """lm-eval's task index over the local tasks (and ``include_paths``); its own
    ~12k task files are indexed (seconds of CPU) only when a task is not found there."""
    paths = [str(TASKS_DIR), *(str(p) for p in include_paths or [])]
    tm = TaskManager(include_path=paths, include_defaults=False)
    if all(t in tm.all_tasks for t in tasks):
        return tm
    tm = TaskManager(include_path=paths, include_defaults=True)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise EvalError(f"--tasks: unknown lm-eval task(s) {', '.join(unknown)} (see `lm-eval ls tasks`)")
    return tm


def _hub_unreachable(e: BaseException) -> bool:
    """Whether an exception (or one it came from) is the hub being out of reach."""
    seen: BaseException | None = e
    while seen is not None:
        name = type(seen).__name__
        if isinstance(seen, ConnectionError) or name in ("OfflineModeIsEnabled", "LocalEntryNotFoundError"):
            return True
        if "offline" in str(seen).lower() or "couldn't reach" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def check_tasks(tm: TaskManager, tasks: list[str]) -> None:
    """Load each task's data now, before an export or a model load can be wasted."""
    for name in tasks:
        try:
            tm.load([name])
        except Exception as e:  # lm-eval and datasets raise many types; the reason is kept
            reason = one_line_reason(e)
            if _hub_unreachable(e):
                offline = " (HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
                raise EvalError(
                    f"task {name} needs its dataset from the Hugging Face hub, which cannot be reached"
                    f"{offline}, and it is not in the local cache: {reason}; run once with network "
                    "access to cache it, or evaluate the offline tasks (--tasks local)"
                ) from e
            raise EvalError(f"task {name}: cannot load its data: {reason}") from e


class TSTHFLM(HFLM):
    """lm-eval's HF model with BOS placed as in training (see the module docstring)."""

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        saved, self.add_bos_token = self.add_bos_token, False
        try:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        finally:
            self.add_bos_token = saved


def trained_seq_len(model_dir: str | Path) -> int | None:
    """The training context of an export (``tst_export.json``), None for other models."""
    meta = Path(model_dir) / "tst_export.json"
    if meta.is_file():
        return json.loads(meta.read_text()).get("seq_len")
    return None


def results_folder(source: str | Path, out: str | Path | None = None) -> Path:
    """``out``, or ``<run>/lm_eval`` for a checkpoint ``<run>/checkpoint/step-N`` or an
    export whose ``tst_export.json`` names one."""
    if out:
        return Path(out)
    src = Path(source)
    meta = src / "tst_export.json"
    ckpt = Path(json.loads(meta.read_text())["source_checkpoint"]) if meta.is_file() else src
    if ckpt.parent.name != "checkpoint":
        raise EvalError(f"{source}: neither <run>/checkpoint/step-N nor an export of one; give --out")
    return ckpt.parent.parent / RESULTS_DIR


def export_checkpoint(config: str, checkpoint: str, overrides: list[str], out_dir: Path) -> Path:
    """Export a DCP checkpoint to ``out_dir/hf-step-N`` (the step's name keeps exports apart)."""
    loaded = load_checkpoint_model(config, checkpoint, overrides)
    return export_hf(loaded, out_dir / f"hf-step-{loaded.step}")


def evaluate(
    model_dir: str | Path,
    tasks: list[str],
    settings: Settings,
    tm: TaskManager,
    limit: int | float | None = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """lm-eval's results dict for ``tasks``, zero-shot; ``tst_titan`` adds how it ran
    (``samples``, each item's log-likelihoods, only with ``log_samples``)."""
    if not (Path(model_dir) / "config.json").is_file():
        raise CheckpointError(f"{model_dir}: no config.json (not a Hugging Face model directory)")
    lm = TSTHFLM(
        pretrained=str(model_dir), device=settings.device, batch_size=settings.batch_size,
        dtype=settings.dtype, max_length=settings.max_length, add_bos_token=True,
    )
    results = simple_evaluate(
        model=lm, tasks=tasks, task_manager=tm, num_fewshot=0, limit=limit, log_samples=log_samples,
    )
    results["tst_titan"] = {"model_dir": str(model_dir), "tasks": tasks, **asdict(settings)}
    return results


def write_results(results: dict[str, Any], out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_FILE
    path.write_text(json.dumps(results, indent=2, default=handle_non_serializable))
    return path


def results_table(results: dict[str, Any]) -> str:
    return make_table(results)


def heldout_rows(max_docs: int = 8, min_chars: int = 1000, max_chars: int = 4000) -> list[dict]:
    """Chunks of the embedded corpus's validation split for ``tst_heldout.jsonl``: the
    first chunk of suitable size of each file, encoding tables left out; the path
    decides the split, so they stay held out under any Python version."""
    rows = []
    for path, start, end in embedded.documents("validation"):
        if len(rows) == max_docs:
            break
        if path.startswith("encodings/") or any(r["path"] == path for r in rows):
            continue
        if min_chars <= end - start <= max_chars:
            text = embedded.read_chunk((path, start, end))
            rows.append({"path": path, "start": start, "end": end, "text": text})
    return rows


def write_heldout_data(path: Path = TASKS_DIR / "tst_heldout.jsonl") -> Path:
    """Rebuild the held-out task's data from this interpreter's stdlib."""
    path.write_text("".join(json.dumps(r) + "\n" for r in heldout_rows()), encoding="utf-8")
    return path

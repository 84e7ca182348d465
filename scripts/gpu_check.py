#!/usr/bin/env python
"""GPU check: every CUDA path of tst-titan on one GPU, in one command, in under 10 minutes.

    bash scripts/gpu_check.sh [OUT_DIR]          # installs what is missing, then runs this
    python scripts/gpu_check.py --out OUT_DIR [--only ROW,ROW] [--budget ROW=SECONDS]

Each row runs in its own process (``--run-row``) with a time budget, inside one kit
deadline; ``OUT_DIR/report.md`` is rewritten after every row, with the row's pass/fail
criteria, figures and verdict. ``OUT_DIR/results.json`` holds the same, and
``OUT_DIR/rows.log`` the tail of every row's output (run directories, checkpoints and
full logs stay in the work directory, ``--work``, outside OUT_DIR). Without CUDA the
CUDA rows read "not run: no CUDA" and the others run. Exit code 1 when a row that ran
failed, 0 otherwise.

(``GPU_CHECK_CPU_DRY_RUN=1`` runs the CUDA rows on CPU at toy sizes where they can run at
all, to check the kit's own plumbing; their verdicts mean nothing there.)

Rows (the kit stops starting rows when its deadline is near):

  preflight   versions, imports, SDPA backends, measured bf16 matmul TFLOP/s
  loss        scripts/bench_loss.py at V = 128,256: multi-hot (and fused) vs float64 and vs one CE
  tst_270m    a 270M TST run across the switch: bf16, compile, 40 steps, token store
  parallel    CP 2, FSDP2 vs DDP2, TP 2: tests/test_parallel.py, 2 ranks sharing GPU 0 over gloo
  moe         10B-A1B MoE layer shapes: grouped GEMM vs the for-loop; 2-layer TST run
  float8      real float8 (torchao, tensorwise) vs bf16 losses, 270M, 20 steps
  async_ckpt  asynchronous checkpoint save and bit-exact resume across the switch
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
TINY = ROOT / "tests" / "assets" / "tiny_cpu.toml"
DEADLINE_S = 540  # the whole kit, install excluded: a lent machine runs a command for 10 minutes


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - a broken torch is reported by preflight
        return False


@dataclasses.dataclass
class Row:
    name: str
    title: str
    cuda_only: bool
    budget: int
    criteria: str
    fn: Callable[["Ctx"], dict]


@dataclasses.dataclass
class Ctx:
    work: Path
    cuda: bool
    log: Callable[[str], None] = print


# -- helpers used by the rows -------------------------------------------------------


def _env(**extra: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.update(extra)
    return env


def run_logged(cmd: list[str], log_path: Path, env: dict | None = None, timeout: float | None = None) -> int:
    """Run a command with its output in ``log_path``; echo its command and last lines."""
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    with open(log_path, "w") as f:
        proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env or _env(), stdout=f,
                              stderr=subprocess.STDOUT, timeout=timeout)
    lines = log_path.read_text(errors="replace").splitlines()
    print("\n".join(lines[-25:]), flush=True)
    return proc.returncode


def torchrun(ctx: Ctx, dump: Path, config: Path, *overrides: str, nproc: int = 1,
             module: str = "tst_titan.train", env: dict | None = None) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", "-m", module,
           "--job.config_file", str(config), "--job.dump_folder", str(dump), *overrides]
    dump.parent.mkdir(parents=True, exist_ok=True)
    extra = {} if ctx.cuda else {"OMP_NUM_THREADS": "1"}
    if module != "tst_titan.train":
        extra["PYTHONPATH"] = os.pathsep.join(p for p in (str(SCRIPTS), os.environ.get("PYTHONPATH")) if p)
    return run_logged(cmd, dump.parent / f"{dump.name}.log", env=_env(**extra, **(env or {})))


def metrics_rows(dump: Path) -> list[dict]:
    path = dump / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_losses(dump: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics_rows(dump) if "loss" in r}


def tb_scalars(dump: Path, tags: list[str]) -> dict[str, dict[int, float]]:
    """TensorBoard scalars of a run (torchtitan's memory, MFU and data-loading tags)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {t: {} for t in tags}
    for ev in sorted(dump.rglob("events.out.tfevents*")):
        acc = EventAccumulator(str(ev), size_guidance={"scalars": 0})
        acc.Reload()
        have = set(acc.Tags().get("scalars", []))
        for t in tags:
            if t in have:
                out[t].update({e.step: e.value for e in acc.Scalars(t)})
    return out


def verdict(checks: list[tuple[str, bool]]) -> tuple[str, list[str]]:
    failed = [name for name, good in checks if not good]
    lines = [("ok   " if good else "FAIL ") + name for name, good in checks]
    return ("pass" if not failed else "FAIL: " + "; ".join(failed)), lines


def fmt(x: float | None, spec: str = ".3g") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


# -- rows ---------------------------------------------------------------------------


def row_preflight(ctx: Ctx) -> dict:
    import importlib
    import platform

    import torch

    figures: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                               "cuda": torch.version.cuda, "hostname": platform.node()}
    checks: list[tuple[str, bool]] = []
    for mod in ("torchtitan", "torchdata", "tyro", "datasets", "tokenizers", "tensorboard", "tst_titan", "torchao"):
        try:
            m = importlib.import_module(mod)
            figures[mod] = getattr(m, "__version__", "present")
            ok = True
        except Exception as e:  # noqa: BLE001 - reported, not raised
            figures[mod] = f"missing ({type(e).__name__}: {str(e)[:120]})"
            ok = mod == "torchao" and not ctx.cuda  # float8 needs it on GPU only
        checks.append((f"import {mod}", ok))
    try:
        import triton

        figures["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        figures["triton"] = "missing (tst-titan stubs torchtitan's MoE kernels without it)"
    if not ctx.cuda:
        a = torch.randn(1024, 1024)
        t0 = time.perf_counter()
        for _ in range(5):
            a @ a
        dt = (time.perf_counter() - t0) / 5
        figures["cpu_fp32_matmul_tflops"] = round(2 * 1024**3 / dt / 1e12, 4)
        figures["sdpa_backends"] = "n/a (no CUDA)"
        status, lines = verdict(checks)
        return {"status": status, "figures": figures, "checks": lines}

    from torch.nn.attention import SDPBackend, sdpa_kernel

    props = torch.cuda.get_device_properties(0)
    figures.update(gpu=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version(),
                   sms=props.multi_processor_count)
    q, k, v = (torch.randn(2, 16, 4096, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    backends = {}
    for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel([b]):
                torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
            torch.cuda.synchronize()
            backends[b.name] = "ok"
        except Exception as e:  # noqa: BLE001
            backends[b.name] = f"fails: {str(e).splitlines()[0][:100]}"
    figures["sdpa_bf16_causal_fwd_bwd"] = backends
    checks.append(("SDPA flash works in bf16 (context parallel shards it)", backends["FLASH_ATTENTION"] == "ok"))
    checks.append(("SDPA cuDNN works in bf16 (torchtitan's first choice)", backends["CUDNN_ATTENTION"] == "ok"))

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    tflops = 2 * n**3 * 10 / (start.elapsed_time(end) / 1e3) / 1e12
    figures["bf16_matmul_tflops"] = round(tflops, 1)
    checks.append(("bf16 8192^3 matmul >= 400 TFLOP/s", tflops >= 400))
    status, lines = verdict(checks)
    return {"status": status, "figures": figures, "checks": lines}


LOSS_VARIANTS = ("ce_eager", "ce_compiled", "mce_eager", "mce_compiled", "fused_compiled")


def row_loss(ctx: Ctx) -> dict:
    """scripts/bench_loss.py's rows (projection + loss, fwd + bwd, bf16 h and W, each variant
    in a fresh process, errors against its float64 reference): ce_* = one stock CE,
    mce_* = the multi-hot loss on logits, fused_* = tst.fused_loss (chunked head)."""
    out = ctx.work / "bench_loss.json"
    dev, vocab, positions = ("cuda", 128256, 8192) if ctx.cuda else ("cpu", 4096, 256)  # CPU: dry run only
    rc = run_logged([sys.executable, SCRIPTS / "bench_loss.py", "--device", dev, "--vocab", str(vocab),
                     "--positions", str(positions), "--bag", "6", "--json", out,
                     "--variants", ",".join(LOSS_VARIANTS)], ctx.work / "bench_loss.log")
    if rc != 0 or not out.exists():
        return {"status": f"FAIL: bench_loss.py exited {rc} (log: bench_loss.log)", "figures": {}}
    rows = {r["variant"]: r for r in json.loads(out.read_text())}
    checks = [(f"bench_loss.py returned {', '.join(LOSS_VARIANTS)}", set(LOSS_VARIANTS) <= set(rows))]
    for v, r in rows.items():
        e, gh, gw = r.get("max_rel_err_loss"), r.get("max_rel_err_grad_h"), r.get("max_rel_err_grad_w")
        checks.append((f"{v}: loss within 1e-3 of float64 ({fmt(e)}), grads within 2e-2 ({fmt(gh)}, {fmt(gw)})",
                       e is not None and e <= 1e-3 and gh is not None and gh <= 2e-2 and gw is not None and gw <= 2e-2))
    ratios = {}

    def ratio(a: str, b: str, max_time: float | None, max_mem: float | None) -> None:
        if a not in rows or b not in rows:
            return
        t = rows[a]["time_ms"] / rows[b]["time_ms"]
        m = rows[a]["peak_mem_bytes"] / max(rows[b]["peak_mem_bytes"], 1)
        ratios[f"{a} / {b}"] = {"time_x": round(t, 3), "memory_x": round(m, 3)}
        if max_mem is not None:
            checks.append((f"{a} peak memory <= {max_mem}x {b} ({m:.2f}x)", m <= max_mem))
        if max_time is not None:
            checks.append((f"{a} time <= {max_time}x {b} ({t:.2f}x)", t <= max_time))

    ratio("mce_eager", "ce_eager", 1.2, 1.2)        # bench_loss.py's targets
    ratio("mce_compiled", "ce_compiled", None, 1.05)
    ratio("fused_compiled", "ce_compiled", 1.3, 0.5)
    status, lines = verdict(checks)
    table = {v: {"time_ms": round(r["time_ms"], 2), "peak_mib": round(r["peak_mem_bytes"] / 2**20, 1),
                 "rel_err_loss": fmt(r.get("max_rel_err_loss"))} for v, r in rows.items()}
    return {"status": status, "figures": {"ratios": ratios, "variants": table}, "checks": lines}


def _prepare_store(ctx: Ctx, vocab: int) -> Path:
    store = ctx.work / f"store-embedded-v{vocab}"
    if not (store / "manifest.json").exists():
        rc = run_logged([sys.executable, SCRIPTS / "prepare_data.py", "--source", "embedded", "--tokenizer",
                         "embedded", "--vocab-size", str(vocab), "--out", store], ctx.work / f"{store.name}.log")
        if rc != 0:
            raise RuntimeError(f"prepare_data.py exited {rc}")
    return store


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(xs) if xs else None


def row_tst_270m(ctx: Ctx) -> dict:
    steps, switch = (40, 20) if ctx.cuda else (8, 4)
    flavor, seq, batch = ("270M", 4096, 8) if ctx.cuda else ("tiny", 64, 2)
    t0 = time.perf_counter()
    store = _prepare_store(ctx, 32768 if ctx.cuda else 2048)
    prep_s = time.perf_counter() - t0
    dump = ctx.work / "tst_270m"
    t0 = time.perf_counter()
    rc = torchrun(
        ctx, dump, ROOT / "train_configs" / "tst_llama3_270m.toml",
        "--model.flavor", flavor, "--training.steps", str(steps), "--tst.superposition_ratio", str(switch / steps),
        "--training.local_batch_size", str(batch), "--training.global_batch_size", str(batch),
        "--training.seq_len", str(seq), "--training.dataset", "store", "--training.dataset_path", str(store),
        "--model.hf_assets_path", "embedded", "--data.embedded_vocab_size", str(32768 if ctx.cuda else 2048),
        "--lr_scheduler.warmup_steps", "10", "--checkpoint.no-enable", "--metrics.log_freq", "1",
        "--metrics.enable_tensorboard", "--metrics.save_tb_folder", "tb",
        *(() if ctx.cuda else ("--compile.no-enable", "--training.mixed_precision_param", "float32")),
    )
    wall = time.perf_counter() - t0
    rows = [r for r in metrics_rows(dump) if "loss" in r]
    if rc != 0 or not rows:
        return {"status": f"FAIL: training exited {rc} (log: tst_270m.log)", "figures": {"wall_s": round(wall, 1)}}
    tb = tb_scalars(dump, ["mfu(%)", "memory/max_active(GiB)", "time_metrics/data_loading(%)", "tflops"])
    skip = 5 if ctx.cuda else 1  # compile warm-up and the first steps of each phase
    p1 = [r for r in rows if r.get("tst/phase") == 1 and r["step"] > skip]
    p2 = [r for r in rows if r.get("tst/phase") == 2 and r["step"] > switch + skip]

    def med(rs, key):
        return _median([r.get(key) for r in rs])

    def tbmed(rs, tag, agg=_median):
        return agg([tb[tag].get(r["step"]) for r in rs if r["step"] in tb[tag]])

    def tbmax(xs):
        xs = [x for x in xs if x is not None]
        return max(xs) if xs else None

    pos1, pos2 = med(p1, "throughput/positions_per_s"), med(p2, "throughput/positions_per_s")
    mem1, mem2 = tbmed(p1, "memory/max_active(GiB)", tbmax), tbmed(p2, "memory/max_active(GiB)", tbmax)
    wait1 = tbmed(p1, "time_metrics/data_loading(%)", lambda xs: statistics.fmean(xs) if xs else None)
    figures = {
        "steps": steps, "switch_step": switch, "flavor": flavor, "batch": f"{batch} x {seq} positions",
        "data_prep_s": round(prep_s, 1), "wall_s": round(wall, 1),
        "positions_per_s_phase1": fmt(pos1, ".4g"), "positions_per_s_phase2": fmt(pos2, ".4g"),
        "data_tokens_per_s_phase1": fmt(med(p1, "throughput/data_tokens_per_s"), ".4g"),
        "mfu_pct_phase1": fmt(tbmed(p1, "mfu(%)")), "mfu_pct_phase2": fmt(tbmed(p2, "mfu(%)")),
        "tflops_phase1": fmt(tbmed(p1, "tflops")), "tflops_phase2": fmt(tbmed(p2, "tflops")),
        "peak_active_gib_phase1": fmt(mem1), "peak_active_gib_phase2": fmt(mem2),
        "data_wait_pct_phase1": fmt(wait1), "loss_first_last": [rows[0]["loss"], rows[-1]["loss"]],
    }
    phases = [r.get("tst/phase") for r in rows]
    checks = [
        (f"{steps} steps, finite losses", len(rows) == steps and all(math.isfinite(r["loss"]) for r in rows)),
        (f"phase 1 for steps 1-{switch}, phase 2 after", phases == [1] * switch + [2] * (steps - switch)),
    ]
    if ctx.cuda:
        checks += [
            ("phase-1 positions/s >= 0.95 x phase 2 (data tokens/s >= 0.95 s x plain)",
             pos1 is not None and pos2 is not None and pos1 >= 0.95 * pos2),
            ("phase-1 peak memory <= 1.05 x phase 2",
             mem1 is not None and mem2 is not None and mem1 <= 1.05 * mem2),
            ("phase-1 time waiting for data <= 5%", wait1 is not None and wait1 <= 5.0),
        ]
    status, lines = verdict(checks)
    return {"status": status, "figures": figures, "checks": lines}


PARALLEL_TESTS = {
    "cp2": ("test_context_parallel_training_matches_single_process", "CP 2 (bf16) vs one process (bf16)",
            ("cp2", "single_bf16")),
    "fsdp_ddp": ("test_ddp_matches_fsdp", "DDP 2 vs FSDP2 2 (fp32)", ("ddp2", "fsdp2")),
    "tp2": ("test_tensor_parallel_with_loss_parallel_matches_single_process",
            "TP 2 + loss parallel vs one process (fp32)", ("tp2", "single")),
}


def row_parallel(ctx: Ctx) -> dict:
    import xml.etree.ElementTree as ET

    xml, base = ctx.work / "parallel.xml", ctx.work / "pytest"
    shutil.rmtree(base, ignore_errors=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_parallel.py"),
           "-k", " or ".join(t for t, _, _ in PARALLEL_TESTS.values()), f"--junitxml={xml}", f"--basetemp={base}"]
    rc = run_logged(cmd, ctx.work / "parallel.log", env=_env(TST_SHARED_GPU="1" if ctx.cuda else "0"))
    outcome: dict[str, str] = {}
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            bad = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
            if bad is None:
                outcome[case.get("name")] = "pass"
            else:
                msg = (bad.get("message") or bad.tag).splitlines()[0][:200]
                outcome[case.get("name")] = ("not run: " if bad.tag == "skipped" else "FAIL: ") + msg
    sub, figures = [], {}
    for key, (test, title, (a, b)) in PARALLEL_TESTS.items():
        la, lb = (_first_losses(base, a), _first_losses(base, b))
        diff = max((abs(la[s] - lb[s]) for s in la if s in lb), default=None) if la and lb else None
        figures[key] = {"max_abs_loss_diff": fmt(diff), f"{a}_losses": [round(v, 5) for v in la.values()]}
        sub.append({"name": key, "title": title, "status": outcome.get(test, f"FAIL: no result (pytest exited {rc})"),
                    "summary": f"max |loss diff| {fmt(diff)} over 6 steps (3 + 3 across the switch)"})
    failed = [s["name"] for s in sub if s["status"] != "pass"]
    status = "pass" if not failed else "FAIL: " + ", ".join(failed)
    return {"status": status, "figures": figures, "subrows": sub}


def _first_losses(base: Path, name: str) -> dict[int, float]:
    for d in sorted(base.glob(f"{name}[0-9]*")):
        if (d / "metrics.jsonl").exists():
            return step_losses(d)
    return {}


def _moe_layer_check() -> dict:
    """torchtitan's MoE layer at 10B-A1B shapes: grouped GEMM vs the for-loop experts."""
    import torch
    from torchtitan.models.moe import MoE

    from tst_titan.specs import tst_qwen3_flavors

    a = tst_qwen3_flavors["10B-A1B"]
    torch.manual_seed(0)
    with torch.device("cuda"):
        moe = MoE(a.moe_args, dim=a.dim, hidden_dim=a.moe_inter_dim)
        moe.init_weights(0.02, buffer_device=torch.device("cuda"))
    moe = moe.to(torch.bfloat16)
    x = torch.randn(2, 4096, a.dim, device="cuda", dtype=torch.bfloat16)
    out, times = {}, {}
    for grouped in (True, False):
        moe.experts.use_grouped_mm = grouped
        xi = x.clone().requires_grad_(True)
        for rep in range(4):  # warm-up, then 3 timed
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            y = moe(xi)
            y.float().pow(2).mean().backward()
            torch.cuda.synchronize()
            if rep:
                times.setdefault(grouped, []).append(time.perf_counter() - t0)
        out[grouped] = (y.detach().float(), xi.grad.float() / 4)
    (yg, gg), (yl, gl) = out[True], out[False]
    return {
        "out_rel_err": float((yg - yl).abs().max() / yl.abs().max()),
        "grad_rel_err": float((gg - gl).abs().max() / gl.abs().max()),
        "grouped_ms": 1e3 * statistics.median(times[True]), "loop_ms": 1e3 * statistics.median(times[False]),
        "tokens": 2 * 4096, "experts": a.moe_args.num_experts, "top_k": a.moe_args.top_k,
    }


def row_moe(ctx: Ctx) -> dict:
    layer = _moe_layer_check()
    dump = ctx.work / "moe"
    t0 = time.perf_counter()
    rc = torchrun(
        ctx, dump, ROOT / "train_configs" / "tst_qwen3_10b_a1b.toml",
        "--model.flavor", "10B-A1B-2L", "--training.steps", "6", "--tst.switch_step", "3",
        "--training.local_batch_size", "2", "--training.global_batch_size", "2", "--training.seq_len", "4096",
        "--training.dataset", "embedded", "--model.hf_assets_path", "embedded", "--compile.no-enable",
        "--checkpoint.no-enable", "--metrics.log_freq", "1", "--lr_scheduler.warmup_steps", "2",
        module="gpu_check_train", env={"GPU_CHECK_FLAVORS": "1"},
    )
    wall = time.perf_counter() - t0
    rows = [r for r in metrics_rows(dump) if "loss" in r]
    figures = {"layer": {k: (fmt(v) if isinstance(v, float) else v) for k, v in layer.items()},
               "run_wall_s": round(wall, 1), "run_losses": [round(r["loss"], 4) for r in rows],
               "run_positions_per_s": fmt(_median([r.get("throughput/positions_per_s") for r in rows[1:]]), ".4g")}
    checks = [
        (f"grouped GEMM output within 2e-2 of the for-loop experts ({layer['out_rel_err']:.2g})",
         layer["out_rel_err"] <= 2e-2),
        (f"grouped GEMM input gradient within 2e-2 of the for-loop ({layer['grad_rel_err']:.2g})",
         layer["grad_rel_err"] <= 2e-2),
        (f"2-layer 10B-A1B TST run: 6 steps (3 at s = 16, 3 next-token), exit {rc}",
         rc == 0 and [r.get("tst/phase") for r in rows] == [1, 1, 1, 2, 2, 2]),
        ("finite losses, step 1 within 1 nat of log(128256)",
         bool(rows) and all(math.isfinite(r["loss"]) for r in rows) and abs(rows[0]["loss"] - math.log(128256)) < 1.0),
    ]
    status, lines = verdict(checks)
    return {"status": status, "figures": figures, "checks": lines}


def row_float8(ctx: Ctx) -> dict:
    common = ("--model.flavor", "270M", "--training.steps", "20", "--tst.superposition_ratio", "0.5",
              "--training.local_batch_size", "4", "--training.global_batch_size", "4", "--training.seq_len", "2048",
              "--training.dataset", "embedded", "--model.hf_assets_path", "embedded", "--compile.no-enable",
              "--checkpoint.no-enable", "--metrics.log_freq", "1", "--lr_scheduler.warmup_steps", "5",
              "--debug.seed", "42", "--activation_checkpoint.mode", "none")
    cfg = ROOT / "train_configs" / "tst_llama3_270m.toml"
    rc_b = torchrun(ctx, ctx.work / "bf16", cfg, *common)
    rc_f = torchrun(ctx, ctx.work / "float8", cfg, *common, "--model.converters", "quantize.linear.float8")
    lb, lf = step_losses(ctx.work / "bf16"), step_losses(ctx.work / "float8")
    log = (ctx.work / "float8.log").read_text(errors="replace") if (ctx.work / "float8.log").exists() else ""
    diffs = [abs(lf[s] - lb[s]) for s in lb if s in lf]
    mean_d, max_d = (statistics.fmean(diffs), max(diffs)) if diffs else (None, None)

    def pos(d):
        return _median([r.get("throughput/positions_per_s") for r in metrics_rows(d) if r.get("step", 0) > 3])

    pb, pf = pos(ctx.work / "bf16"), pos(ctx.work / "float8")
    figures = {"bf16_losses": [round(v, 4) for v in lb.values()], "float8_losses": [round(v, 4) for v in lf.values()],
               "mean_abs_diff": fmt(mean_d), "max_abs_diff": fmt(max_d),
               "positions_per_s_bf16": fmt(pb, ".4g"), "positions_per_s_float8_eager": fmt(pf, ".4g")}
    checks = [
        (f"both runs finish 20 steps (exit {rc_b}, {rc_f})", rc_b == 0 and rc_f == 0 and len(lb) == len(lf) == 20),
        ("real float8 (torchao tensorwise), not emulated", "Float8 tensorwise scaled training active" in log
         and "emulate=True" not in log),
        (f"mean |loss diff| <= 0.05 ({fmt(mean_d)})", mean_d is not None and mean_d <= 0.05),
        (f"max |loss diff| <= 0.15 ({fmt(max_d)})", max_d is not None and max_d <= 0.15),
    ]
    status, lines = verdict(checks)
    return {"status": status, "figures": figures, "checks": lines}


def row_async_ckpt(ctx: Ctx) -> dict:
    modes = ["async", "async_with_pinned_mem"] if ctx.cuda else ["async"]
    checks, figures = [], {}
    for mode in modes:
        args = ("--checkpoint.enable", "--checkpoint.interval", "2", "--checkpoint.async_mode", mode,
                "--debug.deterministic", "--debug.deterministic_warn_only")
        ref, res = ctx.work / f"{mode}-ref", ctx.work / f"{mode}-resumed"
        shutil.rmtree(ref, ignore_errors=True)
        shutil.rmtree(res, ignore_errors=True)
        rc = torchrun(ctx, ref, TINY, *args)
        saved = [s for s in (2, 4, 6, 8) if (ref / "checkpoint" / f"step-{s}" / ".metadata").exists()]
        rc2 = -1
        if (ref / "checkpoint" / "step-2" / ".metadata").exists():
            shutil.copytree(ref / "checkpoint" / "step-2", res / "checkpoint" / "step-2")
            rc2 = torchrun(ctx, res, TINY, *args)
        want, got = step_losses(ref), step_losses(res)
        same = bool(got) and sorted(got) == list(range(3, 9)) and all(got[s] == want.get(s) for s in got)
        diff = max((abs(got[s] - want[s]) for s in got if s in want), default=None)
        figures[mode] = {"saved_steps": saved, "max_abs_loss_diff_after_resume": fmt(diff),
                         "losses": [round(v, 6) for v in want.values()]}
        checks.append((f"{mode}: run exits 0 and every save completes (step-2,4,6,8 .metadata)",
                       rc == 0 and saved == [2, 4, 6, 8]))
        checks.append((f"{mode}: resume from step-2 (crosses the switch at 4) gives losses 3-8 bit for bit "
                       f"(exit {rc2}, max diff {fmt(diff)})", rc2 == 0 and same))
    status, lines = verdict(checks)
    return {"status": status, "figures": figures, "checks": lines}


ROWS = [
    Row("preflight", "Preflight: versions, SDPA backends, bf16 TFLOP/s", False, 60,
        "imports of torchtitan, torchdata, tyro, datasets, tst_titan (and torchao on CUDA) succeed; "
        "on CUDA: flash and cuDNN SDPA run fwd+bwd in bf16, an 8192^3 bf16 matmul reaches >= 400 TFLOP/s",
        row_preflight),
    Row("loss", "Multi-hot loss, V = 128,256, 8192 positions, s = 6", True, 120,
        "scripts/bench_loss.py (output projection + loss, fwd+bwd, bf16, dim 768) for one stock CE, "
        "the multi-hot loss and the fused head, eager and compiled: every loss within 1e-3 (relative) "
        "of the float64 reference and gradients within 2e-2; eager multi-hot <= 1.2x one CE in time "
        "and peak memory; compiled multi-hot <= 1.05x compiled CE in memory; compiled fused head "
        "<= 0.5x memory and <= 1.3x time of compiled CE",
        row_loss),
    Row("tst_270m", "270M TST run across the switch (bf16, compile, 40 steps)", True, 170,
        "40 finite steps, phase 1 = steps 1-20; steady-state (steps 6-20 vs 26-40) phase-1 positions/s "
        ">= 0.95x phase 2, phase-1 peak active memory <= 1.05x phase 2, phase-1 data-loading share <= 5%; "
        "MFU reported (torchtitan's, from positions)",
        row_tst_270m),
    Row("parallel", "CP 2, FSDP2 vs DDP2, TP 2: 2 ranks sharing GPU 0 over gloo", True, 150,
        "tests/test_parallel.py with TST_SHARED_GPU=1: CP 2 (bf16) within 2e-2 of one bf16 process and "
        "grad norms within 5%; DDP within 1e-5 of FSDP2 and equal grad norms; TP 2 + loss parallel "
        "within 1e-4 of one process (6 steps, switch after 3)",
        row_parallel),
    Row("moe", "MoE with grouped GEMM at 10B-A1B layer shapes (2 layers)", True, 90,
        "one MoE layer (112 experts, top 8, dim 1536, 8192 tokens, bf16): grouped GEMM output and input "
        "gradient within 2e-2 (relative to max) of the for-loop experts; a 2-layer 10B-A1B TST run "
        "(s = 16, power-law weights, eager) trains 3 + 3 steps with finite losses, step 1 near log V",
        row_moe),
    Row("float8", "Real float8 vs bf16 losses (270M, 20 steps)", True, 100,
        "both runs finish; torchao tensorwise float8 active (not emulated); mean |loss diff| <= 0.05 and "
        "max <= 0.15 over 20 steps (10 superposition + 10 next-token), same seed and data",
        row_float8),
    Row("async_ckpt", "Asynchronous checkpoint save and exact resume", False, 90,
        "tiny TST run, async save every 2 steps (async; on CUDA also async_with_pinned_mem): every save "
        "completes; a run resumed from step-2 reproduces steps 3-8 bit for bit (deterministic mode)",
        row_async_ckpt),
]
ROW_BY_NAME = {r.name: r for r in ROWS}


# -- driver -------------------------------------------------------------------------


def _commit() -> str:
    if os.environ.get("GPU_CHECK_COMMIT"):
        return os.environ["GPU_CHECK_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown (no git)"
    except Exception:  # noqa: BLE001
        return "unknown (no git)"


def _torch_version() -> str:
    try:
        import torch

        return torch.__version__
    except Exception:  # noqa: BLE001
        return "missing"


def write_report(out: Path, header: dict, results: dict[str, dict]) -> None:
    lines = ["# tst-titan GPU check", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "| row | status | time (s) | what |", "|---|---|---|---|"]
    for row in ROWS:
        r = results.get(row.name, {"status": "pending"})
        lines.append(f"| {row.name} | {r['status']} | {fmt(r.get('seconds'), '.0f')} | {row.title} |")
        for sub in r.get("subrows", []):
            lines.append(f"| {row.name}/{sub['name']} | {sub['status']} | | {sub['title']}: {sub['summary']} |")
    lines += ["", "## Rows: criteria, checks and figures", ""]
    for row in ROWS:
        r = results.get(row.name, {"status": "pending"})
        lines += [f"### {row.name}: {row.title}", "", f"Status: **{r['status']}**"
                  + (f" ({r['seconds']:.0f} s of a {r['budget']} s budget)" if "seconds" in r else ""), "",
                  f"Pass criteria: {row.criteria}.", ""]
        if r.get("checks"):
            lines += ["```", *r["checks"], "```", ""]
        if r.get("figures"):
            lines += ["```json", json.dumps(r["figures"], indent=1, default=str), "```", ""]
        if r.get("error"):
            lines += ["```", r["error"], "```", ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"header": header, "rows": results}, indent=1, default=str))


def _tail(path: Path, n: int = 60) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def run_kit(out: Path, work: Path, only: list[str] | None, budgets: dict[str, int], deadline: float) -> int:
    out.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    cuda = has_cuda()
    t_start = time.time()
    header = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": _commit(),
        "machine": f"{os.cpu_count()} CPU cores, " + ("CUDA" if cuda else "no CUDA") + f", torch {_torch_version()}",
        "command": "bash scripts/gpu_check.sh " + str(out), "work directory": str(work),
        "kit deadline (s)": int(deadline),
    }
    results: dict[str, dict] = {}
    rows_log = out / "rows.log"
    rows_log.write_text("")
    for row in ROWS:
        if only and row.name not in only:
            results[row.name] = {"status": "not run: not selected (--only)"}
            continue
        if row.cuda_only and not cuda and os.environ.get("GPU_CHECK_CPU_DRY_RUN") != "1":
            results[row.name] = {"status": "not run: no CUDA"}
            continue
        left = deadline - (time.time() - t_start)
        if left < 15:
            results[row.name] = {"status": f"not run: kit deadline ({int(deadline)} s) reached"}
            continue
        budget = min(budgets.get(row.name, row.budget), int(left))
        results[row.name] = {"status": "running", "budget": budget}
        write_report(out, header, results)
        res_path, log_path = work / f"{row.name}.result.json", work / "logs" / f"{row.name}.log"
        res_path.unlink(missing_ok=True)
        row_work = work / row.name
        row_work.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, "--run-row", row.name, "--work", str(row_work), "--result", str(res_path)]
        t0 = time.time()
        print(f"[gpu_check] {row.name}: budget {budget} s ...", flush=True)
        with open(log_path, "w") as logf:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=logf, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=budget)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the row and everything it started
                proc.wait()
                rc = None
        seconds = time.time() - t0
        if rc is None:
            res = {"status": f"FAIL: timed out after {budget} s"}
        elif res_path.exists():
            res = json.loads(res_path.read_text())
        else:
            res = {"status": f"FAIL: row process exited {rc} without a result", "error": _tail(log_path, 30)}
        res.update(seconds=round(seconds, 1), budget=budget)
        results[row.name] = res
        with open(rows_log, "a") as f:
            f.write(f"===== {row.name}: {res['status']} ({seconds:.0f} s) =====\n{_tail(log_path)}\n\n")
        print(f"[gpu_check] {row.name}: {res['status']} ({seconds:.0f} s)", flush=True)
        write_report(out, header, results)
    header["total (s)"] = round(time.time() - t_start, 1)
    write_report(out, header, results)
    failed = [n for n, r in results.items() if r["status"].startswith("FAIL")]
    print(f"[gpu_check] report: {out / 'report.md'}; failed rows: {', '.join(failed) or 'none'}", flush=True)
    return 1 if failed else 0


def run_one_row(name: str, work: Path, result: Path) -> int:
    ctx = Ctx(work=work, cuda=has_cuda())
    try:
        res = ROW_BY_NAME[name].fn(ctx)
    except Exception as e:  # noqa: BLE001 - a crash is the row's result
        import traceback

        traceback.print_exc()
        res = {"status": f"FAIL: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
               "error": traceback.format_exc()[-3000:]}
    result.write_text(json.dumps(res, indent=1, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "outputs" / "gpu_check"), help="report directory")
    p.add_argument("--work", help="scratch directory for runs (default: a new one under /tmp)")
    p.add_argument("--only", help="comma-separated rows to run (the others: 'not run')")
    p.add_argument("--budget", action="append", default=[], metavar="ROW=SECONDS", help="override a row's budget")
    p.add_argument("--deadline", type=float, default=DEADLINE_S, help="seconds for the whole kit")
    p.add_argument("--run-row", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_row:
        return run_one_row(args.run_row, Path(args.work), Path(args.result))
    only = args.only.split(",") if args.only else None
    unknown = [n for n in (only or []) if n not in ROW_BY_NAME]
    budgets = {}
    for item in args.budget:
        name, _, secs = item.partition("=")
        budgets[name] = int(secs)
        if name not in ROW_BY_NAME:
            unknown.append(name)
    if unknown:
        p.error(f"unknown rows {unknown}; rows: {list(ROW_BY_NAME)}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    return run_kit(Path(args.out), work, only, budgets, args.deadline)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Equal-FLOPs quality benchmark: baseline vs TST over several seeds, on one corpus.

    python scripts/bench_quality.py                       # ~1 h on 2 CPU cores
    python scripts/bench_quality.py --steps 60 --seeds 1  # a smoke run

Every arm trains the same model for the same number of steps with the same LR schedule
and global batch, so every arm spends the same training FLOPs (a TST phase-1 step runs
the same L positions as a plain step). Arms: the baseline (``--tst.no-enable``) and TST
with each ``--bag-sizes`` value at ``--ratio``. Seeds change the model initialisation
(``debug.seed``) and the document order (``data.shuffle_seed``).

Writes under ``--out``: one dump folder per run (TensorBoard events, metrics.jsonl; a
finished run is not re-run, so an interrupted benchmark continues where it stopped),
``report.md`` (final next-token validation loss per arm: mean and standard deviation
over seeds; the equal-loss speed-up of the seed-averaged curves and per seed) and
``compare.png`` (scripts/compare_runs.py's plots of the seed-averaged curves).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import compare_runs as cr  # noqa: E402


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _finished(dump: Path, steps: int) -> bool:
    f = dump / "metrics.jsonl"
    if not f.exists():
        return False
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return any(r.get("step") == steps and "validation_loss" in r for r in rows)


def _run(dump: Path, args, overrides: list[str]) -> None:
    import shutil

    shutil.rmtree(dump, ignore_errors=True)  # an unfinished run starts over
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
        "--rdzv_backend=c10d", f"--rdzv_endpoint=localhost:{_free_port()}",
        "-m", "tst_titan.train", "--job.config_file", str(args.config),
        "--job.dump_folder", str(dump),
        "--training.steps", str(args.steps),
        "--training.local_batch_size", str(args.global_batch // args.nproc),
        "--training.global_batch_size", str(args.global_batch),
        "--validation.freq", str(args.val_freq),
        "--metrics.enable_tensorboard", "--metrics.log_freq", str(args.val_freq),
        "--checkpoint.no-enable",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    dump.mkdir(parents=True, exist_ok=True)
    with open(dump / "train.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"bench_quality: run {dump.name} failed (rc={proc.returncode}); see {dump / 'train.log'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "train_configs" / "tst_debug_cpu.toml")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--bag-sizes", type=int, nargs="+", default=[4, 6])
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--val-freq", type=int, default=25)
    ap.add_argument("--nproc", type=int, default=1, help="processes per run (gloo on CPU)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per process")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (e.g. 2 on 2 cores with --nproc 1)")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_quality")
    args = ap.parse_args(argv)
    if args.global_batch % args.nproc:
        ap.error("--global-batch must be divisible by --nproc")

    arms: dict[str, list[str]] = {"baseline": ["--tst.no-enable"]}
    for s in args.bag_sizes:
        arms[f"tst_s{s}"] = ["--tst.enable", "--tst.bag_size", str(s), "--tst.superposition_ratio", str(args.ratio)]

    plan = [(arm, seed) for seed in range(args.seeds) for arm in arms]
    todo = [(arm, seed) for arm, seed in plan if not _finished(args.out / f"{arm}_seed{seed}", args.steps)]
    for arm, seed in plan:
        if (arm, seed) not in todo:
            print(f"{arm}_seed{seed}: done earlier, kept", flush=True)
    t0 = time.perf_counter()

    def one(item: tuple[str, int]) -> str:
        arm, seed = item
        dump = args.out / f"{arm}_seed{seed}"
        _run(dump, args, arms[arm] + ["--debug.seed", str(seed), "--data.shuffle_seed", str(1000 + seed)])
        return dump.name

    from concurrent.futures import ThreadPoolExecutor, as_completed

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(one, item) for item in todo]
        for done, fut in enumerate(as_completed(futures), 1):
            name = fut.result()
            per_run = (time.perf_counter() - t0) / done
            eta = time.strftime("%H:%M:%S", time.gmtime(per_run * (len(todo) - done)))
            print(f"[{done}/{len(todo)}] {name}: finished, ETA {eta}", flush=True)

    runs = {arm: [cr.load_run(args.out / f"{arm}_seed{k}", f"{arm}_seed{k}") for k in range(args.seeds)] for arm in arms}
    report = build_report(runs, args)
    (args.out / "report.md").write_text(report)
    print(report)
    print(f"wrote {args.out / 'report.md'} and {args.out / 'compare.png'}")
    return 0


def build_report(runs: dict[str, list[cr.Run]], args) -> str:
    means = {arm: cr.average_runs(rs, arm) for arm, rs in runs.items()}
    spread = {
        arm: statistics.stdev([r.final_loss for r in rs]) if len(rs) > 1 else 0.0 for arm, rs in runs.items()
    }
    baseline = means["baseline"]
    cr.plot(
        list(means.values()), baseline, args.out / "compare.png",
        title=f"mean of {args.seeds} seed(s), {args.steps} steps, global batch {args.global_batch}",
    )
    lines = [
        f"# bench_quality: {args.steps} steps, {args.seeds} seed(s), global batch {args.global_batch}, "
        f"r = {args.ratio}, config {args.config.name}",
        "",
        "## Seed-averaged curves (final loss: mean ± standard deviation over seeds)",
        "",
        cr.markdown_table(list(means.values()), baseline, spread),
        "## Per seed (each TST run against the same seed's baseline)",
        "",
        "| run | final val loss | baseline final val loss | step reaching it | speed-up: steps | FLOPs |",
        "|---|---|---|---|---|---|",
    ]
    for arm, rs in runs.items():
        if arm == "baseline":
            continue
        for k, r in enumerate(rs):
            b = runs["baseline"][k]
            su = cr.equal_loss_speedup(b, r)
            step = "not reached" if su.step is None else f"{su.step:.0f}"
            lines.append(
                f"| {r.name} | {r.final_loss:.4f} | {b.final_loss:.4f} | {step} "
                f"| {cr._x(su.steps)} | {cr._x(su.flops)} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

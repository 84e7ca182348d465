"""Which runs the quality study makes, in the order they run (most important first).

A run is one (model size, arm, length, seed). Every run of a (size, length) has the
same model, steps, batch and LR schedule (AdamW, warm-up 5% of its steps, the configs'
WSD decay), so baseline and TST arms cost the same training FLOPs. Seed k sets
``debug.seed`` = k (initialisation) and ``data.shuffle_seed`` = 1000 + k (document order).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
BASE_CONFIG = "train_configs/study_cpu.toml"
TST_CONFIG = "train_configs/tst_study_cpu.toml"

# model size -> flavor (train_configs/study_cpu.toml's model; tst_titan/specs.py)
SIZES = {"study": "study", "small": "study_small"}
# arm -> (config, overrides); every TST arm is s = 6, r = 0.3 unless its overrides say otherwise
ARMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "baseline": (BASE_CONFIG, ()),
    "tst_s6": (TST_CONFIG, ()),
    "tst_s4": (TST_CONFIG, ("--tst.bag_size", "4")),
    "tst_s8": (TST_CONFIG, ("--tst.bag_size", "8")),
    "tst_input_only": (TST_CONFIG, ("--tst.mode", "input_only")),
    "tst_output_only": (TST_CONFIG, ("--tst.mode", "output_only")),
    "tst_reset_optimizer": (TST_CONFIG, ("--tst.at_switch", "reset_optimizer")),
}
ABLATIONS = [a for a in ARMS if a not in ("baseline", "tst_s6")]


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study."""

    size: str  # a key of SIZES
    arm: str  # a key of ARMS
    steps: int
    seed: int
    val_passes: int  # validation passes after the one torchtitan makes at step 1
    group: str = "main"  # what the run is for: main | ladder | long | small | sweep | ablation
    extra: tuple[str, ...] = field(default=())  # overrides of this run only (the smoke plan)

    @property
    def name(self) -> str:
        return f"{self.size}_{self.arm}_{self.steps}_seed{self.seed}"

    @property
    def config(self) -> str:
        return ARMS[self.arm][0]

    @property
    def val_freq(self) -> int:
        return max(1, self.steps // self.val_passes)

    def overrides(self) -> list[str]:
        """The command-line overrides that make this run from its config."""
        warmup = max(1, round(0.05 * self.steps))
        out = [
            "--training.steps", str(self.steps),
            "--lr_scheduler.warmup_steps", str(warmup),
            "--validation.freq", str(self.val_freq),
            "--checkpoint.interval", str(max(1, self.steps // 4)),
            "--debug.seed", str(self.seed), "--data.shuffle_seed", str(1000 + self.seed),
            "--model.flavor", SIZES[self.size],
        ]
        if self.arm != "baseline":
            out.append("--tst.enable")
        return out + list(ARMS[self.arm][1]) + list(self.extra)


def study_plan(seeds: int = 3, ablations: list[str] | None = None) -> list[RunSpec]:
    """The full study, in priority order (issue 21): the 1200- and 2400-step pairs on 3
    seeds; the second size at 3 lengths (cheap, so it comes before the long runs); a
    baseline ladder (3300, 4800 steps) per seed for the interpolated equal-loss speed-up;
    TST at 4800 steps (2 seeds), each followed by its seed's 7200-step baseline (to bracket it);
    the short lengths of the gap curve; the ablations."""
    ks = range(seeds)
    plan: list[RunSpec] = []
    for steps, passes in ((1200, 3), (2400, 2)):
        for k in ks:
            plan += [RunSpec("study", "baseline", steps, k, passes, "main"),
                     RunSpec("study", "tst_s6", steps, k, passes, "main")]
    for steps in (300, 600, 1200):  # cheap (0.45x a study step): a whole claim per session
        for k in ks:
            plan += [RunSpec("small", "baseline", steps, k, 1, "small"),
                     RunSpec("small", "tst_s6", steps, k, 1, "small")]
    for steps in (3300, 4800):
        plan += [RunSpec("study", "baseline", steps, k, 1, "ladder") for k in ks]
    # a TST run that beats its 4800-step baseline needs a longer one to be read on, not a bound:
    # seed by seed, so that a session cut short leaves one seed readable, not two bounds
    for k in range(min(2, seeds)):
        plan += [RunSpec("study", "tst_s6", 4800, k, 2, "long"), RunSpec("study", "baseline", 7200, k, 1, "ladder")]
    for steps in (150, 400):
        for k in ks:
            plan += [RunSpec("study", "baseline", steps, k, 1, "sweep"),
                     RunSpec("study", "tst_s6", steps, k, 1, "sweep")]
    for arm in ABLATIONS if ablations is None else ablations:
        plan.append(RunSpec("study", arm, 1200, 0, 1, "ablation"))
    return plan


# --smoke: the tiny flavor on the embedded corpus; a few runs of every group, in seconds.
SMOKE_OVERRIDES = (
    "--model.flavor", "tiny", "--training.dataset", "embedded", "--validation.dataset", "embedded",
    "--training.seq_len", "32", "--training.local_batch_size", "2",
    "--validation.seq_len", "32", "--validation.local_batch_size", "4", "--validation.steps", "2",
    "--metrics.log_freq", "2",
)


def smoke_plan() -> list[RunSpec]:
    """Each kind of row at toy lengths, in 7 runs: a pair on two seeds, a longer baseline
    (the ladder), a pair of the second size."""
    e = SMOKE_OVERRIDES
    plan = []
    for k in (0, 1):
        plan += [RunSpec("study", "baseline", 8, k, 1, "main", e), RunSpec("study", "tst_s6", 8, k, 1, "main", e)]
    plan.append(RunSpec("study", "baseline", 16, 0, 1, "ladder", e))
    plan += [RunSpec("small", "baseline", 8, 0, 1, "small", e), RunSpec("small", "tst_s6", 8, 0, 1, "small", e)]
    return plan

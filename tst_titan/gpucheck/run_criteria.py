"""Pass criteria of the GPU check's training-run rows (tst_270m, float8, async_ckpt,
fused_fsdp_bf16, memory_plan), written once as in :mod:`tst_titan.gpucheck.criteria`:
the run's settings and the thresholds are the spec's fields; the prose and the checks
are both made from them. None of the thresholds has been calibrated on a GPU yet.
"""

from __future__ import annotations

import dataclasses

from tst_titan.analysis.fmt import format_number, max_or_none, mean_or_none
from tst_titan.gpucheck.criteria import Check, RowSpec, all_finite, num, phase_pattern

GIB = 2**30


def abs_diffs(a: dict[int, float], b: dict[int, float]) -> list[float]:
    """|a - b| at every step both runs logged."""
    return [abs(a[s] - b[s]) for s in sorted(a) if s in b]


def rel_diffs(a: dict[int, float], b: dict[int, float]) -> dict[int, float]:
    """|a - b| / |b| at every step both runs logged (b: the reference)."""
    return {s: abs(a[s] - b[s]) / max(abs(b[s]), 1e-12) for s in sorted(a) if s in b}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def gib(n_bytes: int | None) -> float | None:
    return None if n_bytes is None else n_bytes / GIB


# -- tst_270m: throughput and memory of the two phases ------------------------------


@dataclasses.dataclass(frozen=True)
class Tst270mMeasured:
    cuda: bool
    exit_code: int
    losses: list[float]
    phases: list[int | None]
    positions_per_s: tuple[float | None, float | None]  # steady-state medians, phase 1 and 2
    peak_active_gib: tuple[float | None, float | None]  # steady-state maxima, phase 1 and 2
    data_wait_pct_phase1: float | None
    figures: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Tst270mSpec(RowSpec):
    flavor: str = "270M"
    steps: int = 40
    switch_step: int = 20
    seq_len: int = 4096
    batch: int = 8
    vocab: int = 32768  # BPE of the embedded corpus, as a token store
    warmup_steps: int = 10
    skip_steps: int = 5  # compile warm-up and the first steps of each phase: not steady state
    min_phase1_speed: float = 0.95  # phase-1 positions/s over phase 2's
    max_phase1_memory: float = 1.05  # phase-1 peak active memory over phase 2's
    max_phase1_data_wait_pct: float = 5.0

    def for_cpu(self) -> "Tst270mSpec":
        return dataclasses.replace(self, flavor="tiny", steps=8, switch_step=4, seq_len=64, batch=2, vocab=2048,
                                   skip_steps=1)

    def steady(self, phase: int) -> range:
        start = 0 if phase == 1 else self.switch_step
        return range(start + self.skip_steps + 1, (self.switch_step if phase == 1 else self.steps) + 1)

    def title(self) -> str:
        return f"{self.flavor} TST run across the switch (bf16, compile, {self.steps} steps)"

    def criteria(self) -> str:
        one, two = self.steady(1), self.steady(2)
        return (f"{self.steps} finite steps of {self.batch} x {self.seq_len} positions, phase 1 = steps "
                f"1-{self.switch_step}; steady-state (steps {one[0]}-{one[-1]} vs {two[0]}-{two[-1]}) phase-1 "
                f"positions/s >= {num(self.min_phase1_speed)}x phase 2, phase-1 peak active memory <= "
                f"{num(self.max_phase1_memory)}x phase 2, phase-1 data-loading share <= "
                f"{num(self.max_phase1_data_wait_pct)}%; MFU reported (torchtitan's, from positions)")

    def checks(self, measured: Tst270mMeasured) -> list[Check]:
        out = [
            Check(f"{self.steps} steps, finite losses (exit {measured.exit_code})",
                  measured.exit_code == 0 and len(measured.losses) == self.steps and all_finite(measured.losses)),
            Check(f"phase 1 for steps 1-{self.switch_step}, phase 2 after",
                  measured.phases == phase_pattern(self.switch_step, self.steps)),
        ]
        if not measured.cuda:
            return out
        speed, memory = ratio(*measured.positions_per_s), ratio(*measured.peak_active_gib)
        wait = measured.data_wait_pct_phase1
        return out + [
            Check(f"phase-1 positions/s >= {num(self.min_phase1_speed)} x phase 2 ({format_number(speed)}x; "
                  f"data tokens/s >= {num(self.min_phase1_speed)} s x plain)",
                  speed is not None and speed >= self.min_phase1_speed),
            Check(f"phase-1 peak memory <= {num(self.max_phase1_memory)} x phase 2 ({format_number(memory)}x)",
                  memory is not None and memory <= self.max_phase1_memory),
            Check(f"phase-1 time waiting for data <= {num(self.max_phase1_data_wait_pct)}% ({format_number(wait)}%)",
                  wait is not None and wait <= self.max_phase1_data_wait_pct),
        ]


# -- float8: real float8 vs bf16 losses ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class Float8Measured:
    exit_codes: tuple[int, int]  # bf16, float8
    losses_bf16: dict[int, float]
    losses_float8: dict[int, float]
    float8_active: bool  # torchao's tensorwise float8 training announced itself
    emulated: bool
    figures: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Float8Spec(RowSpec):
    flavor: str = "270M"
    steps: int = 20
    switch_step: int = 10
    batch: int = 4
    seq_len: int = 2048
    warmup_steps: int = 5
    seed: int = 42
    max_mean_abs_diff: float = 0.05
    max_abs_diff: float = 0.15

    def title(self) -> str:
        return f"Real float8 vs bf16 losses ({self.flavor}, {self.steps} steps)"

    def criteria(self) -> str:
        return (f"both runs finish; torchao tensorwise float8 active (not emulated); mean |loss diff| <= "
                f"{num(self.max_mean_abs_diff)} and max <= {num(self.max_abs_diff)} over {self.steps} steps "
                f"({self.switch_step} superposition + {self.steps - self.switch_step} next-token), same seed and data")

    def checks(self, measured: Float8Measured) -> list[Check]:
        diffs = abs_diffs(measured.losses_float8, measured.losses_bf16)
        mean_diff, max_diff = mean_or_none(diffs), max_or_none(diffs)
        counts = (len(measured.losses_bf16), len(measured.losses_float8))
        return [
            Check(f"both runs finish {self.steps} steps (exit {measured.exit_codes[0]}, {measured.exit_codes[1]})",
                  measured.exit_codes == (0, 0) and counts == (self.steps, self.steps)),
            Check("real float8 (torchao tensorwise), not emulated", measured.float8_active and not measured.emulated),
            Check(f"mean |loss diff| <= {num(self.max_mean_abs_diff)} ({format_number(mean_diff)})",
                  mean_diff is not None and mean_diff <= self.max_mean_abs_diff),
            Check(f"max |loss diff| <= {num(self.max_abs_diff)} ({format_number(max_diff)})",
                  max_diff is not None and max_diff <= self.max_abs_diff),
        ]


# -- async_ckpt: asynchronous save and exact resume ---------------------------------


@dataclasses.dataclass(frozen=True)
class AsyncModeMeasured:
    exit_code: int
    saved_steps: list[int]  # steps whose checkpoint has its .metadata
    resume_exit: int  # -1: not started (no checkpoint to resume from)
    losses: dict[int, float]  # the uninterrupted run
    resumed_losses: dict[int, float]


@dataclasses.dataclass(frozen=True)
class AsyncCkptMeasured:
    modes: dict[str, AsyncModeMeasured]
    figures: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class AsyncCkptSpec(RowSpec):
    steps: int = 8
    switch_step: int = 4
    interval: int = 2
    resume_from: int = 2
    modes: tuple[str, ...] = ("async",)
    cuda_modes: tuple[str, ...] = ("async", "async_with_pinned_mem")  # pinned memory needs CUDA

    def saves(self) -> list[int]:
        return list(range(self.interval, self.steps + 1, self.interval))

    def title(self) -> str:
        return "Asynchronous checkpoint save and exact resume"

    def criteria(self) -> str:
        extra = [mode for mode in self.cuda_modes if mode not in self.modes]
        return (f"tiny TST run, async save every {self.interval} steps ({', '.join(self.modes)}; on CUDA also "
                f"{', '.join(extra)}): every save completes; a run resumed from step-{self.resume_from} reproduces "
                f"steps {self.resume_from + 1}-{self.steps} bit for bit, across the switch at {self.switch_step} "
                f"(deterministic mode)")

    def resumed_exactly(self, mode: AsyncModeMeasured) -> bool:
        got, want = mode.resumed_losses, mode.losses
        return (bool(got) and sorted(got) == list(range(self.resume_from + 1, self.steps + 1))
                and all(got[s] == want.get(s) for s in got))

    def checks(self, measured: AsyncCkptMeasured) -> list[Check]:
        out = []
        saves = self.saves()
        for name, mode in measured.modes.items():
            diff = max_or_none(abs_diffs(mode.resumed_losses, mode.losses))
            out += [
                Check(f"{name}: run exits 0 and every save completes (step-{','.join(map(str, saves))} .metadata)",
                      mode.exit_code == 0 and mode.saved_steps == saves),
                Check(f"{name}: resume from step-{self.resume_from} (crosses the switch at {self.switch_step}) gives "
                      f"losses {self.resume_from + 1}-{self.steps} bit for bit (exit {mode.resume_exit}, max diff "
                      f"{format_number(diff)})", mode.resume_exit == 0 and self.resumed_exactly(mode)),
            ]
        return out


# -- fused_fsdp_bf16: tst.fused_loss under FSDP2 in bf16 ----------------------------


@dataclasses.dataclass(frozen=True)
class FusedFsdpMeasured:
    exit_codes: tuple[int, int]  # unfused, fused
    losses: dict[int, float]  # unfused
    fused_losses: dict[int, float]
    first_grad_norms: tuple[float | None, float | None]  # step 1: unfused, fused
    fused_phases: list[int | None]
    fsdp_bf16: bool  # both logs: FSDP applied, mixed precision handled by fully_shard
    fused_head: bool  # the fused run's log announces the chunked head
    figures: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class FusedFsdpSpec(RowSpec):
    """The same run twice, with and without ``[tst] fused_loss``. Torchtitan applies FSDP
    only from 2 shards, so 2 ranks share GPU 0 over gloo (slow collectives, true numbers)."""

    flavor: str = "270M"
    ranks: int = 2
    steps: int = 8
    switch_step: int = 4
    batch: int = 2  # per rank
    seq_len: int = 1024
    warmup_steps: int = 2
    seed: int = 42
    chunk_size: int = 1024
    param_dtype: str = "bfloat16"
    # Step 1 has the same weights and data: only the loss computation differs.
    max_first_loss_rel_diff: float = 1e-3
    max_first_grad_norm_rel_diff: float = 1e-2
    # Later steps also carry bf16 rounding differences of the updates.
    max_loss_rel_diff: float = 1e-2

    def for_cpu(self) -> "FusedFsdpSpec":
        return dataclasses.replace(self, flavor="tiny", seq_len=64, chunk_size=48, param_dtype="float32")

    def title(self) -> str:
        return (f"Fused loss under FSDP2 in bf16 ({self.flavor}, {self.ranks} ranks sharing GPU 0, "
                f"{self.steps} steps)")

    def criteria(self) -> str:
        return (f"{self.flavor}, {self.ranks} ranks sharing GPU 0 over gloo (FSDP2 shard degree {self.ranks}, "
                f"{self.param_dtype} parameters), {self.batch} x {self.seq_len} positions per rank, eager, {self.switch_step} + "
                f"{self.steps - self.switch_step} steps, run with [tst] fused_loss (chunks of {self.chunk_size}) and "
                f"without, same seed and data: both finish with finite losses; FSDP and the fused head active; the "
                f"fused run switches after step {self.switch_step}; step-1 loss within "
                f"{num(self.max_first_loss_rel_diff)} and step-1 grad norm within "
                f"{num(self.max_first_grad_norm_rel_diff)} of the unfused run (relative); every step's loss within "
                f"{num(self.max_loss_rel_diff)} (relative)")

    def checks(self, measured: FusedFsdpMeasured) -> list[Check]:
        diffs = rel_diffs(measured.fused_losses, measured.losses)
        first, worst = diffs.get(1), max_or_none(diffs.values())
        unfused_norm, fused_norm = measured.first_grad_norms
        norm_diff = abs(fused_norm - unfused_norm) / unfused_norm if unfused_norm and fused_norm is not None else None
        return [
            Check(f"both runs finish {self.steps} steps with finite losses "
                  f"(exit {measured.exit_codes[0]}, {measured.exit_codes[1]})",
                  measured.exit_codes == (0, 0) and len(measured.losses) == len(measured.fused_losses) == self.steps
                  and all_finite(measured.losses.values()) and all_finite(measured.fused_losses.values())),
            Check("FSDP applied, mixed precision handled by fully_shard, in both runs", measured.fsdp_bf16),
            Check(f"fused head active (chunks of {self.chunk_size} positions)", measured.fused_head),
            Check(f"fused run: phase 1 for steps 1-{self.switch_step}, phase 2 after",
                  measured.fused_phases == phase_pattern(self.switch_step, self.steps)),
            Check(f"step-1 loss within {num(self.max_first_loss_rel_diff)} of the unfused run ({format_number(first)})",
                  first is not None and first <= self.max_first_loss_rel_diff),
            Check(f"step-1 grad norm within {num(self.max_first_grad_norm_rel_diff)} of the unfused run "
                  f"({format_number(norm_diff)})",
                  norm_diff is not None and norm_diff <= self.max_first_grad_norm_rel_diff),
            Check(f"every step's loss within {num(self.max_loss_rel_diff)} of the unfused run (max "
                  f"{format_number(worst)})", worst is not None and worst <= self.max_loss_rel_diff),
        ]


# -- memory_plan: measured peak memory vs the plan's estimate -----------------------


@dataclasses.dataclass(frozen=True)
class MemoryPlanMeasured:
    exit_code: int
    phases: list[int | None]
    peak_bytes: dict[int, int | None]  # phase -> max of torch.cuda.max_memory_allocated over its steps
    estimate_bytes: dict[int, int | None]  # phase -> the plan's estimate
    estimate_error: str | None = None  # why there is no estimate
    figures: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class MemoryPlanSpec(RowSpec):
    config: str = "tst_llama3_270m.toml"
    flavor: str = "270M"
    steps: int = 6
    switch_step: int = 3
    batch: int = 8
    seq_len: int = 4096
    warmup_steps: int = 2
    ngpu: int = 1
    compile: bool = True
    # estimate / measured: a plan may over-estimate (headroom) more than under-estimate (an OOM).
    min_estimate_ratio: float = 0.9
    max_estimate_ratio: float = 1.3

    def for_cpu(self) -> "MemoryPlanSpec":
        return dataclasses.replace(self, flavor="tiny", seq_len=64, batch=2, compile=False)

    def title(self) -> str:
        return f"Peak GPU memory vs the memory plan ({self.flavor}, {self.batch} x {self.seq_len}, both phases)"

    def criteria(self) -> str:
        return (f"{self.flavor} ({self.config}: bf16, {'compile' if self.compile else 'eager'}), {self.batch} x "
                f"{self.seq_len} positions on {self.ngpu} GPU, {self.switch_step} + {self.steps - self.switch_step} "
                f"steps: the largest torch.cuda.max_memory_allocated of each phase's steps, against the memory "
                f"plan's estimate of that phase: estimate / measured between {num(self.min_estimate_ratio)} and "
                f"{num(self.max_estimate_ratio)}")

    def checks(self, measured: MemoryPlanMeasured) -> list[Check]:
        out = [Check(f"run finishes {self.steps} steps, switch after {self.switch_step} (exit {measured.exit_code})",
                     measured.exit_code == 0 and measured.phases == phase_pattern(self.switch_step, self.steps))]
        if measured.estimate_error is not None:
            out.append(Check(f"memory plan estimate: {measured.estimate_error}", False))
        for phase in (1, 2):
            peak, estimate = measured.peak_bytes.get(phase), measured.estimate_bytes.get(phase)
            out.append(Check(f"phase {phase}: peak allocated measured ({format_number(gib(peak), '.2f')} GiB)",
                             peak is not None))
            if measured.estimate_error is None:
                share = ratio(estimate, peak)
                out.append(Check(
                    f"phase {phase}: estimate {format_number(gib(estimate), '.2f')} GiB / measured "
                    f"{format_number(gib(peak), '.2f')} GiB = {format_number(share)}, within "
                    f"[{num(self.min_estimate_ratio)}, {num(self.max_estimate_ratio)}]",
                    share is not None and self.min_estimate_ratio <= share <= self.max_estimate_ratio))
        return out

"""Pass criteria of the GPU check, written once: each row's settings and thresholds are
named numbers in a frozen dataclass (its *spec*); :meth:`RowSpec.criteria` writes the
prose of the report from them and :meth:`RowSpec.checks` applies the same numbers to
what the row measured. Nothing here runs anything, so the tests can feed fabricated
measurements. This module: the shared pieces and the kernel-level rows (preflight, loss,
parallel, MoE); :mod:`tst_titan.gpucheck.run_criteria`: the training-run rows.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

from tst_titan.analysis.fmt import format_number


@dataclasses.dataclass(frozen=True)
class Check:
    text: str
    passed: bool


def verdict(checks: Iterable[Check]) -> tuple[str, list[str]]:
    """The row's status ('pass', or 'FAIL: ' and the failed checks) and one line per check."""
    checks = list(checks)
    failed = [c.text for c in checks if not c.passed]
    lines = [("ok   " if c.passed else "FAIL ") + c.text for c in checks]
    return ("pass" if not failed else "FAIL: " + "; ".join(failed)), lines


def num(x: float) -> str:
    """A threshold as the prose writes it (0.95, 1e-05, 400)."""
    return format(x, "g")


def all_finite(xs: Iterable[float]) -> bool:
    xs = list(xs)
    return bool(xs) and all(math.isfinite(x) for x in xs)


def phase_pattern(switch_step: int, steps: int) -> list[int]:
    """The ``tst/phase`` of every step of a run that switches after ``switch_step``."""
    return [1] * switch_step + [2] * (steps - switch_step)


class RowSpec:
    """What every row's spec provides (the specs are frozen dataclasses deriving from this)."""

    def title(self) -> str:
        raise NotImplementedError

    def criteria(self) -> str:
        """The pass criteria in prose, made from the spec's numbers."""
        raise NotImplementedError

    def checks(self, measured: Any) -> list[Check]:
        """The criteria applied to what the row measured, with the same numbers."""
        raise NotImplementedError

    def for_cpu(self) -> "RowSpec":
        """The toy sizes of ``GPU_CHECK_CPU_DRY_RUN=1`` (plumbing only; verdicts mean nothing)."""
        return self

    def subrows(self, measured: Any) -> list[dict]:
        return []


# -- preflight ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PreflightMeasured:
    cuda: bool
    imports: dict[str, bool]
    sdpa: dict[str, str] = dataclasses.field(default_factory=dict)  # backend -> "ok" / "fails: ..."
    bf16_tflops: float | None = None
    figures: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class PreflightSpec(RowSpec):
    modules: tuple[str, ...] = ("torchtitan", "torchdata", "tyro", "datasets", "tokenizers", "tensorboard",
                                "tst_titan", "torchao")
    cuda_only_modules: tuple[str, ...] = ("torchao",)  # float8 needs it on a GPU only
    # (torch.nn.attention.SDPBackend name, short name, why it matters)
    sdpa_backends: tuple[tuple[str, str, str], ...] = (
        ("FLASH_ATTENTION", "flash", "context parallel shards it"),
        ("CUDNN_ATTENTION", "cuDNN", "torchtitan's first choice"),
    )
    matmul_size: int = 8192
    min_bf16_tflops: float = 400.0

    def title(self) -> str:
        return "Preflight: versions, SDPA backends, bf16 TFLOP/s"

    def criteria(self) -> str:
        always = [name for name in self.modules if name not in self.cuda_only_modules]
        backends = " and ".join(short for _, short, _ in self.sdpa_backends)
        return (f"imports of {', '.join(always)} succeed (and {', '.join(self.cuda_only_modules)} on CUDA); "
                f"on CUDA: {backends} SDPA run fwd+bwd in bf16, an {self.matmul_size}^3 bf16 matmul reaches "
                f">= {num(self.min_bf16_tflops)} TFLOP/s")

    def checks(self, measured: PreflightMeasured) -> list[Check]:
        excused = () if measured.cuda else self.cuda_only_modules
        out = [Check(f"import {mod}", measured.imports.get(mod, False) or mod in excused) for mod in self.modules]
        if measured.cuda:
            out += [Check(f"SDPA {short} works in bf16 ({why})", measured.sdpa.get(name) == "ok")
                    for name, short, why in self.sdpa_backends]
            tflops = measured.bf16_tflops
            out.append(Check(f"bf16 {self.matmul_size}^3 matmul >= {num(self.min_bf16_tflops)} TFLOP/s "
                             f"({format_number(tflops, '.1f')})",
                             tflops is not None and tflops >= self.min_bf16_tflops))
        return out


# -- loss: scripts/bench_loss.py ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RatioLimit:
    """``variant`` against ``baseline``: time and peak memory at most these multiples (None: no limit)."""

    variant: str
    baseline: str
    max_time: float | None
    max_memory: float | None

    def text(self) -> str:
        parts = [f"<= {num(x)}x {self.baseline} in {what}"
                 for x, what in ((self.max_time, "time"), (self.max_memory, "peak memory")) if x is not None]
        return f"{self.variant} " + " and ".join(parts)


def variant_ratio(results: dict[str, dict], variant: str, baseline: str) -> tuple[float, float] | None:
    """(time, peak memory) of ``variant`` over ``baseline`` in bench_loss.py's rows; None if either is missing."""
    if variant not in results or baseline not in results:
        return None
    a, b = results[variant], results[baseline]
    return a["time_ms"] / b["time_ms"], a["peak_mem_bytes"] / max(b["peak_mem_bytes"], 1)


@dataclasses.dataclass(frozen=True)
class LossMeasured:
    exit_code: int
    results: dict[str, dict]  # variant -> bench_loss.py's row (time_ms, peak_mem_bytes, max_rel_err_*)
    figures: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class LossSpec(RowSpec):
    """ce_* = one stock CE, mce_* = the multi-hot loss on logits, fused_* = tst.fused_loss."""

    variants: tuple[str, ...] = ("ce_eager", "ce_compiled", "mce_eager", "mce_compiled", "fused_compiled")
    device: str = "cuda"
    vocab: int = 128256
    positions: int = 8192
    bag_size: int = 6
    dim: int = 768
    max_loss_rel_err: float = 1e-3
    max_grad_rel_err: float = 2e-2
    ratio_limits: tuple[RatioLimit, ...] = (  # bench_loss.py's targets
        RatioLimit("mce_eager", "ce_eager", max_time=1.2, max_memory=1.2),
        RatioLimit("mce_compiled", "ce_compiled", max_time=None, max_memory=1.05),
        RatioLimit("fused_compiled", "ce_compiled", max_time=1.3, max_memory=0.5),
    )

    def for_cpu(self) -> "LossSpec":
        return dataclasses.replace(self, device="cpu", vocab=4096, positions=256)

    def title(self) -> str:
        return f"Multi-hot loss, V = {self.vocab:,}, {self.positions} positions, s = {self.bag_size}"

    def criteria(self) -> str:
        return (f"scripts/bench_loss.py (output projection + loss, fwd+bwd, bf16, dim {self.dim}) for "
                f"{', '.join(self.variants)}: every loss within {num(self.max_loss_rel_err)} (relative) of the "
                f"float64 reference and gradients within {num(self.max_grad_rel_err)}; "
                + "; ".join(limit.text() for limit in self.ratio_limits))

    def checks(self, measured: LossMeasured) -> list[Check]:
        out = [Check(f"bench_loss.py exits 0 and returns {', '.join(self.variants)} (exit {measured.exit_code})",
                     measured.exit_code == 0 and set(self.variants) <= set(measured.results))]
        for variant, row in measured.results.items():
            loss, grad_h, grad_w = (row.get(f"max_rel_err_{k}") for k in ("loss", "grad_h", "grad_w"))
            good = (loss is not None and loss <= self.max_loss_rel_err
                    and all(err is not None and err <= self.max_grad_rel_err for err in (grad_h, grad_w)))
            out.append(Check(f"{variant}: loss within {num(self.max_loss_rel_err)} of float64 ({format_number(loss)}), "
                             f"grads within {num(self.max_grad_rel_err)} ({format_number(grad_h)}, "
                             f"{format_number(grad_w)})", good))
        for limit in self.ratio_limits:
            ratio = variant_ratio(measured.results, limit.variant, limit.baseline)
            if ratio is None:
                continue  # already failed above: a variant is missing
            time_x, memory_x = ratio
            if limit.max_memory is not None:
                out.append(Check(f"{limit.variant} peak memory <= {num(limit.max_memory)}x {limit.baseline} "
                                 f"({memory_x:.2f}x)", memory_x <= limit.max_memory))
            if limit.max_time is not None:
                out.append(Check(f"{limit.variant} time <= {num(limit.max_time)}x {limit.baseline} ({time_x:.2f}x)",
                                 time_x <= limit.max_time))
        return out


# -- parallel: tests/test_parallel.py on one GPU ------------------------------------


@dataclasses.dataclass(frozen=True)
class ParallelCase:
    key: str
    test: str  # the pytest function
    title: str
    runs: tuple[str, str]  # the two run names whose losses the figures compare


@dataclasses.dataclass(frozen=True)
class ParallelMeasured:
    pytest_exit: int
    outcomes: dict[str, str]  # test -> "pass" / "FAIL: ..." / "not run: ..."
    loss_diffs: dict[str, float | None]  # case key -> max |loss diff| of its two runs
    figures: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ParallelSpec(RowSpec):
    """The tolerances are the tests' own (tests/test_parallel.py): one place, the test."""

    test_file: str = "tests/test_parallel.py"
    cases: tuple[ParallelCase, ...] = (
        ParallelCase("cp2", "test_context_parallel_training_matches_single_process",
                     "CP 2 (bf16) vs one process (bf16)", ("cp2", "single_bf16")),
        ParallelCase("fsdp_ddp", "test_ddp_matches_fsdp", "DDP 2 vs FSDP2 2 (fp32)", ("ddp2", "fsdp2")),
        ParallelCase("tp2", "test_tensor_parallel_with_loss_parallel_matches_single_process",
                     "TP 2 + loss parallel vs one process (fp32)", ("tp2", "single")),
    )

    def title(self) -> str:
        return "CP 2, FSDP2 vs DDP2, TP 2: 2 ranks sharing GPU 0 over gloo"

    def criteria(self) -> str:
        return (f"{self.test_file} with TST_SHARED_GPU=1 (2 ranks sharing GPU 0 over gloo), across the switch: "
                + "; ".join(c.title for c in self.cases) + ": each test passes (the tolerances are the tests' own)")

    def status_of(self, case: ParallelCase, measured: ParallelMeasured) -> str:
        return measured.outcomes.get(case.test, f"FAIL: no result (pytest exited {measured.pytest_exit})")

    def checks(self, measured: ParallelMeasured) -> list[Check]:
        return [Check(f"{c.key}: {self.status_of(c, measured)}", self.status_of(c, measured) == "pass")
                for c in self.cases]

    def subrows(self, measured: ParallelMeasured) -> list[dict]:
        return [{"name": c.key, "title": c.title, "status": self.status_of(c, measured),
                 "summary": f"max |loss diff| {format_number(measured.loss_diffs.get(c.key))} across the switch"}
                for c in self.cases]


# -- moe: grouped GEMM at 10B-A1B shapes, and a 2-layer run -------------------------


@dataclasses.dataclass(frozen=True)
class MoeMeasured:
    out_rel_err: float | None
    grad_rel_err: float | None
    exit_code: int
    phases: list[int | None]
    losses: list[float]
    figures: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class MoeSpec(RowSpec):
    layer_flavor: str = "10B-A1B"
    layer_batch: int = 2
    layer_seq_len: int = 4096
    max_out_rel_err: float = 2e-2  # relative to the for-loop's largest value
    max_grad_rel_err: float = 2e-2
    run_config: str = "tst_qwen3_10b_a1b.toml"
    run_flavor: str = "10B-A1B-2L"  # the layer shapes with 2 layers (tst_titan.gpucheck.launch)
    steps: int = 6
    switch_step: int = 3
    batch: int = 2
    seq_len: int = 4096
    warmup_steps: int = 2
    vocab: int = 128256
    max_first_loss_gap: float = 1.0  # nats from log V at step 1

    def title(self) -> str:
        return f"MoE with grouped GEMM at {self.layer_flavor} layer shapes (2 layers)"

    def criteria(self) -> str:
        return (f"one {self.layer_flavor} MoE layer ({self.layer_batch * self.layer_seq_len} tokens, bf16): grouped "
                f"GEMM output within {num(self.max_out_rel_err)} and input gradient within "
                f"{num(self.max_grad_rel_err)} (relative to max) of the for-loop experts; a {self.run_flavor} TST run "
                f"(its config's bag size and slot weights, eager) trains {self.switch_step} + "
                f"{self.steps - self.switch_step} steps with finite losses, step 1 within "
                f"{num(self.max_first_loss_gap)} nat of log({self.vocab})")

    def checks(self, measured: MoeMeasured) -> list[Check]:
        first_gap = abs(measured.losses[0] - math.log(self.vocab)) if measured.losses else None
        return [
            Check(f"grouped GEMM output within {num(self.max_out_rel_err)} of the for-loop experts "
                  f"({format_number(measured.out_rel_err, '.2g')})",
                  measured.out_rel_err is not None and measured.out_rel_err <= self.max_out_rel_err),
            Check(f"grouped GEMM input gradient within {num(self.max_grad_rel_err)} of the for-loop "
                  f"({format_number(measured.grad_rel_err, '.2g')})",
                  measured.grad_rel_err is not None and measured.grad_rel_err <= self.max_grad_rel_err),
            Check(f"{self.run_flavor} TST run: {self.steps} steps ({self.switch_step} superposition, "
                  f"{self.steps - self.switch_step} next-token), exit {measured.exit_code}",
                  measured.exit_code == 0 and measured.phases == phase_pattern(self.switch_step, self.steps)),
            Check(f"finite losses, step 1 within {num(self.max_first_loss_gap)} nat of log({self.vocab}) "
                  f"({format_number(first_gap)})",
                  all_finite(measured.losses) and first_gap is not None and first_gap < self.max_first_loss_gap),
        ]

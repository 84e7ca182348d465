"""The rows of the GPU check, in the order they run (the kit stops starting rows when its
deadline is near; the last two are new and can be run alone with ``--only``):

  preflight        versions, imports, SDPA backends, measured bf16 matmul TFLOP/s
  loss             scripts/bench_loss.py at V = 128,256: multi-hot (and fused) vs float64 and vs one CE
  tst_270m         a 270M TST run across the switch: bf16, compile, 40 steps, token store
  parallel         CP 2, FSDP2 vs DDP2, TP 2: tests/test_parallel.py, 2 ranks sharing GPU 0 over gloo
  moe              10B-A1B MoE layer shapes: grouped GEMM vs the for-loop; 2-layer TST run
  float8           real float8 (torchao, tensorwise) vs bf16 losses, 270M, 20 steps
  async_ckpt       asynchronous checkpoint save and bit-exact resume across the switch
  fused_fsdp_bf16  [tst] fused_loss under FSDP2 in bf16 vs the unfused loss, 270M, across the switch
  memory_plan      peak allocated GPU memory of each phase (270M) vs the memory plan's estimate
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

from tst_titan.gpucheck.criteria import LossSpec, MoeSpec, ParallelSpec, PreflightSpec, RowSpec
from tst_titan.gpucheck.run_criteria import (
    AsyncCkptSpec, Float8Spec, FusedFsdpSpec, MemoryPlanSpec, Tst270mSpec,
)


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    budget_s: int  # the row's process is killed after this many seconds
    cuda_only: bool  # without CUDA: "not run: no CUDA"
    spec: RowSpec  # settings and thresholds; the criteria text and the checks come from it
    runs: str  # "module:function" measuring the row, imported only in the row's own process

    @property
    def title(self) -> str:
        return self.spec.title()

    @property
    def criteria(self) -> str:
        return self.spec.criteria()

    def measure_fn(self) -> Callable:
        module, _, function = self.runs.partition(":")
        return getattr(importlib.import_module(module), function)


_PKG = "tst_titan.gpucheck"
ROWS = [
    Row("preflight", 60, False, PreflightSpec(), f"{_PKG}.preflight:measure_preflight"),
    Row("loss", 120, True, LossSpec(), f"{_PKG}.benches:measure_loss"),
    Row("tst_270m", 170, True, Tst270mSpec(), f"{_PKG}.training:measure_tst_270m"),
    Row("parallel", 150, True, ParallelSpec(), f"{_PKG}.training:measure_parallel"),
    Row("moe", 90, True, MoeSpec(), f"{_PKG}.benches:measure_moe"),
    Row("float8", 100, True, Float8Spec(), f"{_PKG}.training:measure_float8"),
    Row("async_ckpt", 120, False, AsyncCkptSpec(), f"{_PKG}.training:measure_async_ckpt"),
    Row("fused_fsdp_bf16", 240, True, FusedFsdpSpec(), f"{_PKG}.training:measure_fused_fsdp_bf16"),
    Row("memory_plan", 240, True, MemoryPlanSpec(), f"{_PKG}.memory_row:measure_memory_plan"),
]
ROW_BY_NAME = {row.name: row for row in ROWS}

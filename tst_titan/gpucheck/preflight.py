"""The preflight row: versions, imports, SDPA backends and a bf16 matmul's TFLOP/s."""

from __future__ import annotations

import importlib
import platform
import time
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from tst_titan.gpucheck.criteria import PreflightMeasured, PreflightSpec
from tst_titan.gpucheck.runs import RowContext


def _module_versions(modules: tuple[str, ...]) -> tuple[dict[str, bool], dict[str, str]]:
    """Import each module (the point of the row: a missing one is reported, not raised)."""
    imports, versions = {}, {}
    for name in modules:
        try:
            module = importlib.import_module(name)
            imports[name], versions[name] = True, getattr(module, "__version__", "present")
        except Exception as e:  # noqa: BLE001 - reported, not raised
            imports[name], versions[name] = False, f"missing ({type(e).__name__}: {str(e)[:120]})"
    try:
        versions["triton"] = importlib.import_module("triton").__version__
    except Exception:  # noqa: BLE001
        versions["triton"] = "missing (tst-titan stubs torchtitan's MoE kernels without it)"
    return imports, versions


def _sdpa_backends() -> dict[str, str]:
    """Causal SDPA fwd+bwd in bf16 at 4096 positions under each backend alone."""
    q, k, v = (torch.randn(2, 16, 4096, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
            torch.cuda.synchronize()
            out[backend.name] = "ok"
        except Exception as e:  # noqa: BLE001
            out[backend.name] = f"fails: {str(e).splitlines()[0][:100]}"
    return out


def _bf16_matmul_tflops(n: int, reps: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12


def _cpu_fp32_matmul_tflops(n: int = 1024, reps: int = 5) -> float:
    a = torch.randn(n, n)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ a
    return 2 * n**3 / ((time.perf_counter() - t0) / reps) / 1e12


def measure_preflight(ctx: RowContext, spec: PreflightSpec) -> PreflightMeasured:
    imports, versions = _module_versions(spec.modules)
    figures: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                               "cuda": torch.version.cuda, "hostname": platform.node(), **versions}
    if not ctx.cuda:
        figures.update(cpu_fp32_matmul_tflops=round(_cpu_fp32_matmul_tflops(), 4), sdpa_backends="n/a (no CUDA)")
        return PreflightMeasured(cuda=False, imports=imports, figures=figures)
    props = torch.cuda.get_device_properties(0)
    sdpa = _sdpa_backends()
    tflops = _bf16_matmul_tflops(spec.matmul_size)
    capability = ".".join(map(str, torch.cuda.get_device_capability(0)))
    figures.update(gpu=torch.cuda.get_device_name(0), capability=capability,
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version(),
                   sms=props.multi_processor_count, sdpa_bf16_causal_fwd_bwd=sdpa, bf16_matmul_tflops=round(tflops, 1))
    return PreflightMeasured(cuda=True, imports=imports, sdpa=sdpa, bf16_tflops=tflops, figures=figures)

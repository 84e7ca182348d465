"""tst-titan: Token Superposition Training as a TorchTitan 0.2.2 recipe.

Importing the package registers the ``tst_llama3`` and ``tst_qwen3`` TrainSpecs
(so ``[experimental] custom_import = "tst_titan"`` works with torchtitan's own
entry point too) and, on a machine without CUDA, applies the CPU shims.
"""

from tst_titan.device import apply_cpu_shims

apply_cpu_shims()

from tst_titan.specs import register_specs  # noqa: E402

register_specs()

__version__ = "0.1.0"

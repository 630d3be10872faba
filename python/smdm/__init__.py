"""smdm: masked diffusion language models (training, guided sampling, likelihoods, ARM comparisons).

Heavy and optional pieces (CUDA kernels, CuPy, matplotlib) are imported lazily; `import smdm` works on a
CPU-only machine.
"""

from __future__ import annotations

from smdm.errors import SmdmFormatError, SmdmIOError

__version__ = "0.1.0"

__all__ = ["SmdmFormatError", "SmdmIOError", "__version__", "generate", "infill", "load"]

# submodules reachable as attributes (`smdm.evaluate.score(...)` after a plain `import smdm`), imported on first use
_SUBMODULES = ("checkpoint", "config", "convert", "corpus", "data", "diffusion", "evaluate", "kernels", "linear_ce",
               "model", "rng", "sampling", "sft", "train")


def __getattr__(name):  # lazy exports: keep `import smdm` cheap (no torch import here)
    if name == "load":
        from smdm.checkpoint import load

        return load
    if name in ("generate", "infill"):  # guided generation (smdm.sampling)
        from smdm import sampling

        return getattr(sampling, name)
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"smdm.{name}")
    raise AttributeError(f"module 'smdm' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))

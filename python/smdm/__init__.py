"""smdm: masked diffusion language models (training, guided sampling, likelihoods, ARM comparisons).

Heavy and optional pieces (CUDA kernels, CuPy, matplotlib) are imported lazily; `import smdm` works on a
CPU-only machine.
"""

from __future__ import annotations

from smdm.errors import SmdmFormatError, SmdmIOError

__version__ = "0.1.0"

__all__ = ["SmdmFormatError", "SmdmIOError", "__version__"]

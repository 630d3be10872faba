"""Type stubs of the Rust extension `smdm._core` (rust/src/bindings). Each part appends its section."""

from typing import Optional, Tuple

import numpy as np
import numpy.typing as npt

__version__: str

class SmdmFormatError(ValueError): ...
class SmdmIOError(OSError): ...

def splitmix64(x: int) -> int: ...
def rng_key(words: list[int]) -> int: ...

# ---- masking (rust/src/mask.rs, rust/src/bindings/mask.rs) ----

def forward_process(
    tokens: npt.NDArray[np.uint16] | npt.NDArray[np.uint32] | npt.NDArray[np.int64],
    *,
    seed: int,
    step: int,
    mask_id: int,
    sample_offset: int = 0,
    global_batch: Optional[int] = None,
    eps: float = 1e-3,
    stratified: bool = False,
    prompt_lens: Optional[npt.NDArray[np.int64]] = None,
    crop_prob: float = 0.01,
    p_uncond: float = 0.0,
) -> Tuple[
    np.ndarray,  # noisy (B, L') dtype of tokens
    npt.NDArray[np.bool_],  # mask (B, L')
    npt.NDArray[np.float64],  # t (B,)
    npt.NDArray[np.float64],  # p (B,)
    npt.NDArray[np.float32],  # weight (B, L')
    int,  # length L'
    npt.NDArray[np.bool_],  # uncond (B,)
]:
    """The forward process of docs/CONTRACTS.md over a C-contiguous (B, L) array (GIL released).
    Raises ValueError for bad arguments (eps, mask_id, prompt_lens, layout, dtype)."""

"""Type stubs of the Rust extension `smdm._core` (rust/src/bindings). Each part appends its section."""

from typing import Optional, Tuple

import numpy as np
import numpy.typing as npt

__version__: str

class SmdmFormatError(ValueError): ...
class SmdmIOError(OSError): ...

def splitmix64(x: int) -> int: ...
def rng_key(words: list[int]) -> int: ...

# ---- data (rust/src/{shard,litpkds,pack,tokenize}.rs, rust/src/bindings/data.rs) ----
# Header dicts: version, dtype ("uint16" | "uint32"), num_tokens, num_docs, vocab_size, eos_id,
# bos_id (None = no BOS), payload_crc32, file_bytes, and file_crc32 when the payload was verified.

SHARD_HEADER_LEN: int  # 64
LITPKDS_HEADER_LEN: int  # 24

def shard_write(
    path: str,
    tokens: npt.NDArray[np.uint16] | npt.NDArray[np.uint32],
    doc_starts: npt.NDArray[np.uint64],
    vocab_size: int,
    eos_id: int,
    bos_id: Optional[int] = None,
) -> dict:
    """Write an smdm shard v1 atomically (temp name, fsync, rename); ValueError for bad ids/starts."""

def shard_info(path: str, verify: bool = True) -> dict:
    """Checked header (+ payload CRC, document starts, token ids with `verify`)."""

def shard_read(path: str, verify: bool = True) -> Tuple[dict, np.ndarray, npt.NDArray[np.uint64]]:
    """(header, tokens in the file dtype, document starts)."""

def litpkds_write(path: str, tokens: npt.NDArray[np.uint32], dtype_code: int) -> int:
    """One LITPKDS file holding exactly `tokens` (integer dtype codes); returns the file's CRC-32."""

def litpkds_read(path: str) -> Tuple[int, int, np.ndarray]:
    """(dtype code, chunk_size, items in the file's dtype)."""

def litpkds_tokens(path: str, vocab_size: Optional[int] = None) -> npt.NDArray[np.uint32]:
    """Items as token ids, each checked to be an integer in [0, vocab_size)."""

def pack_documents(
    tokens: npt.NDArray[np.uint32], lengths: npt.NDArray[np.uint64], eos_id: int, vocab_size: int
) -> Tuple[npt.NDArray[np.uint16] | npt.NDArray[np.uint32], npt.NDArray[np.uint64]]:
    """(stream = each document + [eos] in the shard dtype, document starts); parallel, GIL released."""

class Tokenizer:
    """A tokenizer.json (the `tokenizers` crate) that encodes in parallel with the GIL released."""

    @staticmethod
    def from_file(path: str, eos_token: Optional[str] = None) -> Tokenizer: ...
    @staticmethod
    def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def bos_id(self) -> Optional[int]: ...
    def to_json(self) -> str: ...
    def encode(self, texts: list[str]) -> list[list[int]]: ...
    def encode_pack(
        self, texts: list[str]
    ) -> Tuple[npt.NDArray[np.uint16] | npt.NDArray[np.uint32], npt.NDArray[np.uint64]]: ...
    def decode(self, ids: list[int]) -> str: ...

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
    schedule: str = "linear",
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
    `schedule`: "linear" | "cosine" | "polynomial:P" (masking probability 1 - alpha(t'), weight w(t')).
    Raises ValueError for bad arguments (eps, mask_id, prompt_lens, schedule, layout, dtype)."""

# ---- sampler token choice on the CPU (rust/src/sampler.rs, rust/src/bindings/sampler.rs) ----

def choose_tokens(
    logits: npt.NDArray[np.float32],
    seeds: npt.NDArray[np.int64],
    steps: npt.NDArray[np.int64],
    positions: npt.NDArray[np.int64],
    temperature: float,
    confidence: str,
    top_k: int = 0,
    top_p: float = 1.0,
) -> Tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Token and confidence per row of C-contiguous float32 (N, V) logits, bit for bit
    `smdm.kernels._reference.choose_tokens_reference` (Gumbel noise of (seeds[n], steps[n], positions[n]);
    top_k <= 0 and top_p >= 1 filter nothing); rows in parallel with the GIL released. `confidence`: "prob" |
    "margin" | "entropy". ValueError names a bad argument."""

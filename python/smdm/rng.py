"""Counter-based random numbers (the reference; `rust/src/rng.rs` and the CUDA kernels implement the same).

Every draw is a pure function of a key, so a resumed run, another batch split or another number of loader
workers draws identical numbers:

    splitmix64(x)   SplitMix64 finaliser (a bijection on uint64)
    key(w0, ..., wn) = fold of h = splitmix64(h ^ w) from h = 0
    uniform(h)      = (h >> 11) * 2**-53, a float64 in [0, 1)

Streams (the 4th key word) keep draws for different purposes apart; see `Stream`.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


class Stream:
    """The 4th key word of each kind of draw (must equal `rng::stream` in Rust)."""

    TIME = 1  # t per sample: key(seed, step, sample, TIME, 0)
    STRATIFIED = 2  # shared offset of stratified t: key(seed, step, 0, STRATIFIED, 0)
    TOKEN = 3  # token j of a sample: splitmix64(key(seed, step, sample, TOKEN) ^ j)
    CROP = 4  # random-length crop: key(seed, step, 0, CROP, 0) and key(seed, step, 0, CROP, 1)
    UNCOND = 5  # prompt drop for CFG training: key(seed, step, sample, UNCOND, 0)
    GUMBEL = 6  # sampler noise: splitmix64(key(seed, step, position, GUMBEL) ^ vocab_id)


def splitmix64(x):
    """SplitMix64 of a uint64 numpy array (wrapping arithmetic), or of a Python int."""
    if isinstance(x, (int, np.integer)) and not isinstance(x, np.ndarray):
        z = (int(x) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)
    # wrapping is the point: a 0-d array computes with numpy scalars, whose integer overflow warns
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def key(*words: int) -> int:
    """Hash of a sequence of non-negative words (Python ints < 2**64)."""
    h = 0
    for w in words:
        h = splitmix64(h ^ (int(w) & _MASK64))
    return h


def uniform(h):
    """float64 in [0, 1) from the top 53 bits of h (a Python int or a uint64 array)."""
    if isinstance(h, np.ndarray):
        return (h >> np.uint64(11)).astype(np.float64) * (2.0**-53)
    return (int(h) >> 11) * (2.0**-53)

# python -m pytest -q tests/test_masking.py
"""The forward process (DESIGN §4, docs/CONTRACTS.md "Forward process"): the Rust core equals the numpy
reference exactly, a sample's draws do not depend on the batch split, and the draws have the right
distribution (fixed seeds, so every statistical bound here is deterministic)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from smdm import diffusion, rng
from smdm.diffusion import NoisyBatch, forward_process, forward_process_reference

_core = pytest.importorskip("smdm._core")

MASK = 32000
DTYPES = [np.uint16, np.uint32, np.int64]


def _tokens(B, L, dtype=np.int64, seed=0):
    return np.random.default_rng(seed).integers(0, 32000, size=(B, L)).astype(dtype)


def _assert_same(a, b):
    """All seven outputs equal, dtypes included."""
    names = ("noisy", "mask", "t", "p", "weight", "length", "uncond")
    for name, u, v in zip(names, a, b):
        if name == "length":
            assert u == v, name
        else:
            assert u.dtype == v.dtype, (name, u.dtype, v.dtype)
            np.testing.assert_array_equal(u, v, err_msg=name)


def _both(x, **kw):
    kw.setdefault("mask_id", MASK)
    rust = _core.forward_process(x, **kw)
    ref = forward_process_reference(x, **kw)
    _assert_same(rust, ref)
    return rust


# ---- Rust == reference ----


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 64), (8, 513), (40, 1024)])  # 40x1024: rayon path
@pytest.mark.parametrize("seed", [0, 1, 2**63 + 5])
def test_rust_equals_reference(dtype, shape, seed):
    x = _tokens(*shape, dtype=dtype, seed=seed % 1000)
    _both(x, seed=seed, step=17, crop_prob=0.0)
    _both(x, seed=seed, step=18, stratified=True, crop_prob=0.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rust_equals_reference_options(dtype):
    B, L = 12, 300
    x = _tokens(B, L, dtype)
    pl = np.random.default_rng(3).integers(0, L + 1, size=B)
    pl[0], pl[1] = 0, L
    for step in range(4):
        _both(x, seed=5, step=step, prompt_lens=pl, p_uncond=0.5, crop_prob=1.0, stratified=step % 2 == 0)
        _both(x, seed=5, step=step, eps=1.0)  # p = 1: everything masked
        _both(x, seed=5, step=step, eps=0.3, sample_offset=1000, global_batch=2000, stratified=True)
    assert _both(x, seed=5, step=0, crop_prob=1.0)[5] < L  # this key does crop


def test_public_api_torch_and_reference_env(monkeypatch):
    x = torch.from_numpy(_tokens(4, 100))
    pl = torch.tensor([0, 10, 50, 100])
    kw = dict(seed=3, step=9, mask_id=MASK, prompt_lens=pl, p_uncond=0.5, crop_prob=0.0)
    a = forward_process(x, **kw)
    monkeypatch.setenv("SMDM_KERNELS", "reference")
    b = forward_process(x, **kw)
    assert isinstance(a, NoisyBatch) and a.length == b.length == 100
    for f in ("noisy_ids", "mask", "t", "p", "weight", "uncond"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert a.noisy_ids.dtype == torch.int64 and a.mask.dtype == torch.bool
    assert a.t.dtype == a.p.dtype == torch.float64 and a.weight.dtype == torch.float32
    assert a.uncond.shape == (4,) and a.uncond.dtype == torch.bool
    # numpy uint16 windows give the same draws, as int64 tensors
    c = forward_process(x.numpy().astype(np.uint16), **kw)
    assert c.noisy_ids.dtype == torch.int64 and torch.equal(c.noisy_ids, a.noisy_ids)


def test_outputs_are_fresh_writable_arrays():
    x = _tokens(2, 8)
    noisy, mask, *_ = _core.forward_process(x, seed=0, step=0, mask_id=MASK)
    assert noisy.flags.c_contiguous and noisy.flags.writeable and noisy.base is None
    noisy[:] = 0  # does not touch the input
    assert x.any()


# ---- the same sample gets the same draws whatever the batch split ----


@pytest.mark.parametrize("stratified", [False, True])
@pytest.mark.parametrize("split", [[16], [8, 8], [5, 11], [1, 2, 13]])
def test_batch_split_invariance(stratified, split):
    B, L = 16, 2048  # the full batch takes the parallel path, small parts the serial one
    x = _tokens(B, L)
    pl = np.arange(B) * 7
    kw = dict(seed=11, step=3, mask_id=MASK, stratified=stratified, prompt_lens=pl, p_uncond=0.3,
              crop_prob=1.0, global_batch=B)
    full = forward_process(x, **kw)
    parts, off = [], 0
    for n in split:
        parts.append(forward_process(x[off:off + n], **{**kw, "prompt_lens": pl[off:off + n]},
                                     sample_offset=off))
        off += n
    for f in ("noisy_ids", "mask", "t", "p", "weight", "uncond"):
        assert torch.equal(torch.cat([getattr(q, f) for q in parts]), getattr(full, f)), f
    assert {q.length for q in parts} == {full.length}  # the crop is the same on every rank


# ---- semantics and statistics ----


def test_row_semantics():
    B, L = 6, 400
    x = _tokens(B, L)
    pl = np.array([0, 0, 3, 100, 399, 400])
    noisy, mask, t, p, weight, length, uncond = _both(x, seed=1, step=2, prompt_lens=pl, crop_prob=0.0)
    assert length == L and not uncond.any()
    np.testing.assert_array_equal(p, (1 - 1e-3) * t + 1e-3)
    np.testing.assert_array_equal(noisy, np.where(mask, MASK, x))
    np.testing.assert_array_equal(weight, np.where(mask, (1 / p).astype(np.float32)[:, None], 0))
    assert not (mask & (np.arange(L) < pl[:, None])).any()  # prompts are never masked
    # the token draw is the documented one
    for i in range(B):
        token_key = np.uint64(rng.key(1, 2, i, rng.Stream.TOKEN))
        u = rng.uniform(rng.splitmix64(token_key ^ np.arange(L, dtype=np.uint64)))
        np.testing.assert_array_equal(mask[i], (u < p[i]) & (np.arange(L) >= pl[i]))


def test_mask_fraction_matches_p():
    B, L = 64, 4096
    _, mask, _, p, *_ = _core.forward_process(_tokens(B, L), seed=7, step=0, mask_id=MASK, crop_prob=0.0)
    frac = mask.mean(axis=1)
    sigma = np.sqrt(p * (1 - p) / L)
    assert np.all(np.abs(frac - p) <= 5 * sigma + 1e-12)
    # pooled: the mean over all tokens is within 4 sigma of the mean p
    assert abs(mask.mean() - p.mean()) <= 4 * np.sqrt(np.mean(p * (1 - p)) / (B * L))


def _ks(samples):
    """Kolmogorov–Smirnov distance of samples from U[0, 1)."""
    s = np.sort(samples)
    n = len(s)
    return max(np.max(np.arange(1, n + 1) / n - s), np.max(s - np.arange(n) / n))


def test_t_is_uniform():
    n = 4096
    _, _, t, *_ = _core.forward_process(_tokens(n, 1), seed=123, step=4, mask_id=MASK, crop_prob=0.0)
    assert np.all((t >= 0) & (t < 1))
    assert _ks(t) < 1.63 / math.sqrt(n)  # the 1% critical value
    # and across steps for one sample (the key changes with the step)
    one = _tokens(1, 1)
    ts = np.array([_core.forward_process(one, seed=1, step=s, mask_id=MASK)[2][0] for s in range(1000)])
    assert _ks(ts) < 1.63 / math.sqrt(1000)


@pytest.mark.parametrize("B", [1, 2, 7, 32, 256])
def test_stratified_t_covers_each_bin_once(B):
    for step in range(5):
        t = _core.forward_process(_tokens(B, 2), seed=9, step=step, mask_id=MASK, stratified=True)[2]
        np.testing.assert_array_equal(np.sort(np.floor(t * B).astype(int)), np.arange(B))


def test_weights_bounded_by_one_over_eps():
    for eps in (1e-3, 0.05, 0.5, 1.0):
        x = _tokens(256, 64)
        _, mask, _, p, weight, *_ = _core.forward_process(x, seed=2, step=1, mask_id=MASK, eps=eps)
        assert p.min() >= eps and weight.max() <= np.float32(1 / eps)
        assert np.all(weight[~mask] == 0) and np.all(weight[mask] >= 1)


def test_crop_probability_and_range():
    L = 100
    lengths = [diffusion.crop_length(0, s, L, 0.01) for s in range(20000)]
    cropped = sum(n < L for n in lengths)  # a crop to exactly L is possible but rare
    assert 140 <= cropped <= 260  # 20000 · 0.01 = 200, sigma 14
    forced = [diffusion.crop_length(1, s, L, 1.0) for s in range(5000)]
    assert min(forced) == 1 and max(forced) == L
    assert _ks((np.array(forced) - 0.5) / L) < 1.63 / math.sqrt(5000) + 1 / L


def test_prompt_drop_rate_and_effect():
    B, L = 2000, 8
    x = _tokens(B, L)
    pl = np.full(B, 4)
    noisy, mask, *_, uncond = _core.forward_process(x, seed=4, step=0, mask_id=MASK, prompt_lens=pl,
                                                    p_uncond=0.2, crop_prob=0.0)
    assert abs(uncond.mean() - 0.2) < 4 * math.sqrt(0.2 * 0.8 / B)
    assert np.all(noisy[uncond, :4] == MASK) and np.all(noisy[~uncond, :4] == x[~uncond, :4])
    assert not mask[:, :4].any()  # dropped prompts stay out of the loss
    # the documented draw
    u = [rng.uniform(rng.key(4, 0, s, rng.Stream.UNCOND, 0)) for s in range(B)]
    np.testing.assert_array_equal(np.array(u) < 0.2, uncond)


# ---- schedules ----


@pytest.mark.parametrize("name", sorted(diffusion.ALPHAS))
def test_schedule_weights_are_minus_dalpha_over_one_minus_alpha(name):
    t = np.linspace(0.01, 0.99, 99)
    h = 1e-6
    dalpha = (diffusion.alpha(t + h, name) - diffusion.alpha(t - h, name)) / (2 * h)
    np.testing.assert_allclose(diffusion.elbo_weight(t, name), -dalpha / (1 - diffusion.alpha(t, name)),
                               rtol=1e-6)
    assert diffusion.alpha(0.0, name) == 1.0 and abs(diffusion.alpha(1.0, name)) < 1e-12
    tt = torch.tensor(t)
    np.testing.assert_allclose(diffusion.elbo_weight(tt, name).numpy(), diffusion.elbo_weight(t, name),
                               rtol=1e-12)


def test_linear_schedule_and_unknown_name():
    assert diffusion.elbo_weight(0.25) == 4.0 and diffusion.alpha(0.25) == 0.75
    with pytest.raises(ValueError, match="unknown schedule 'nope'"):
        diffusion.alpha(0.5, "nope")


# ---- bad arguments: ValueError with a clear message, from both paths ----

BAD = [
    (dict(eps=0.0), r"eps must be in \(0, 1\]"),
    (dict(eps=float("nan")), "eps must be in"),
    (dict(eps=1.5), "eps must be in"),
    (dict(crop_prob=-0.1), "crop_prob must be in"),
    (dict(p_uncond=2.0, prompt_lens=[0, 0]), "p_uncond must be in"),
    (dict(p_uncond=0.1), "p_uncond > 0 needs prompt_lens"),
    (dict(prompt_lens=[0, 11]), r"prompt_lens\[1\] = 11 is outside \[0, 10\]"),
    (dict(prompt_lens=[-1, 0]), r"prompt_lens\[0\] = -1"),
    (dict(prompt_lens=[1, 2, 3]), "one entry per row|one per row"),
    (dict(stratified=True, sample_offset=4), "needs global_batch"),
    (dict(global_batch=5, sample_offset=4), "global_batch 5 must be >= 1 and cover"),
    (dict(mask_id=70000), "mask_id 70000 does not fit the token dtype uint16"),
]


@pytest.mark.parametrize("kw,msg", BAD)
@pytest.mark.parametrize("path", ["rust", "reference"])
def test_bad_arguments(kw, msg, path, monkeypatch):
    if path == "reference":
        monkeypatch.setenv("SMDM_KERNELS", "reference")
    x = _tokens(2, 10, np.uint16)
    args = {"seed": 0, "step": 0, "mask_id": 100, **kw}
    with pytest.raises(ValueError, match=msg):
        forward_process(x, **args)


@pytest.mark.parametrize("kw,msg", [b for b in BAD if "prompt_lens" not in b[0] or "p_uncond" in b[0]]
                         + [(dict(prompt_lens=np.array([0, 11])), r"prompt_lens\[1\] = 11")])
def test_bad_arguments_reach_python_from_rust(kw, msg):
    """The Rust core validates on its own (no panic crosses into Python)."""
    if "prompt_lens" in kw:
        kw = {**kw, "prompt_lens": np.asarray(kw["prompt_lens"], dtype=np.int64)}
    with pytest.raises(ValueError, match=msg):
        _core.forward_process(_tokens(2, 10, np.uint16), seed=0, step=0, **{"mask_id": 100, **kw})


def test_bad_token_arrays():
    x = _tokens(4, 10)
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.forward_process(x[:, ::2], seed=0, step=0, mask_id=1)
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.forward_process(np.asfortranarray(x), seed=0, step=0, mask_id=1)
    # arguments are checked before the outputs are allocated: 2^45 rows of length 0 hold no ids, and their
    # outputs (2^45 t, p, uncond) used to be allocated first, a PanicException when numpy returned no array
    with pytest.raises(ValueError, match="sequence length must be >= 1"):
        _core.forward_process(np.empty((2**45, 0), np.int64), seed=0, step=0, mask_id=1)
    with pytest.raises(ValueError, match="uint16, uint32 or int64"):
        _core.forward_process(x.astype(np.int32), seed=0, step=0, mask_id=1)
    with pytest.raises(ValueError, match="uint16, uint32 or int64"):
        _core.forward_process(x[0], seed=0, step=0, mask_id=1)
    with pytest.raises(ValueError, match="sequence length must be >= 1"):
        _core.forward_process(x[:, :0].copy(), seed=0, step=0, mask_id=1)
    with pytest.raises(ValueError, match="integer token ids"):
        forward_process(x.astype(np.float32), seed=0, step=0, mask_id=1)
    with pytest.raises(ValueError, match="2-D"):
        forward_process(x[0], seed=0, step=0, mask_id=1)
    with pytest.raises(ValueError, match="seed must be an integer"):
        forward_process(x, seed=-1, step=0, mask_id=1)
    # the public function accepts what it can convert: strided views and int32 windows
    a = forward_process(x[:, ::2], seed=0, step=0, mask_id=1)
    b = forward_process(np.ascontiguousarray(x[:, ::2]).astype(np.int32), seed=0, step=0, mask_id=1)
    assert torch.equal(a.noisy_ids, b.noisy_ids)


# ---- property test ----


@settings(max_examples=150, deadline=None)
@given(
    B=st.integers(1, 6),
    L=st.integers(1, 70),
    seed=st.integers(0, 2**64 - 1),
    step=st.integers(0, 2**40),
    offset=st.integers(0, 1000),
    dtype=st.sampled_from(DTYPES),
    stratified=st.booleans(),
    crop=st.sampled_from([0.0, 0.5, 1.0]),
    eps=st.sampled_from([1e-3, 0.1, 1.0]),
    p_uncond=st.sampled_from([0.0, 0.5]),
    data=st.data(),
)
def test_property_rust_equals_reference(B, L, seed, step, offset, dtype, stratified, crop, eps, p_uncond,
                                        data):
    x = _tokens(B, L, dtype, seed=seed % 97)
    pl = np.array(data.draw(st.lists(st.integers(0, L), min_size=B, max_size=B)), dtype=np.int64)
    noisy, mask, t, p, weight, length, uncond = _both(
        x, seed=seed, step=step, sample_offset=offset, global_batch=offset + B + 3, stratified=stratified,
        crop_prob=crop, eps=eps, prompt_lens=pl, p_uncond=p_uncond)
    assert 1 <= length <= L and noisy.shape == mask.shape == weight.shape == (B, length)
    j = np.arange(length)
    prompt = j < pl[:, None]
    assert not (mask & prompt).any()
    expect = np.where(mask | (prompt & uncond[:, None]), MASK, x[:, :length])
    np.testing.assert_array_equal(noisy, expect)
    assert np.all((t >= 0) & (t < 1)) and np.all(weight <= np.float32(1 / eps))


# ---- concurrency, edge shapes, the benchmark's torch baseline ----


def test_threads_share_nothing():
    """The core releases the GIL; concurrent calls from Python threads give the same arrays."""
    from concurrent.futures import ThreadPoolExecutor

    x = _tokens(32, 2048)
    want = _core.forward_process(x, seed=8, step=1, mask_id=MASK)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: _core.forward_process(x, seed=8, step=1, mask_id=MASK), range(8)))
    for out in outs:
        _assert_same(out, want)


def test_empty_batch():
    out = _both(_tokens(0, 16), seed=0, step=0, crop_prob=0.0)
    assert out[0].shape == (0, 16) and out[2].shape == (0,)


def test_torch_baseline_is_the_same_math():
    from smdm.benchmarks.mask import forward_process_torch, splitmix64_torch

    v = np.array([0, 1, 2**63, 2**64 - 1, 0x9E3779B97F4A7C15], dtype=np.uint64)
    got = splitmix64_torch(torch.from_numpy(v.view(np.int64))).numpy().view(np.uint64)
    np.testing.assert_array_equal(got, rng.splitmix64(v))
    x = _tokens(5, 300)
    pl = np.array([0, 3, 299, 300, 7])
    kw = dict(seed=2**64 - 3, step=4, mask_id=MASK, sample_offset=10, crop_prob=1.0)
    want = _core.forward_process(x, prompt_lens=pl, **kw)
    got = forward_process_torch(torch.from_numpy(x), prompt_lens=torch.from_numpy(pl), **kw)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), w)


def test_bench_mask_smoke(tmp_path):
    """`smdm bench mask` runs end to end on a tiny shape and writes one record per (variant, batch)."""
    import argparse
    import json

    from smdm.benchmarks import mask as bench

    parser = bench.register(argparse.ArgumentParser())
    args = parser.parse_args(["--batch", "2", "--seq-len", "64", "--min-time", "0.001",
                              "--json", str(tmp_path / "m.json")])
    assert args.func(args) == 0
    records = json.loads((tmp_path / "m.json").read_text())
    assert {r["variant"] for r in records} >= {"rust", "torch", "numpy reference"}
    for r in records:
        assert r["tokens_per_s"] > 0 and set(r["ratio_vs"]) == set(bench.BASELINES)
        assert r["environment"]["torch"] == torch.__version__


# ---- noise schedules in the forward process (docs/CONTRACTS.md "Forward process") ----

SCHEDULES = ["cosine", "polynomial:2", "polynomial:0.5", "polynomial:3.7"]


def _documented_p_w(schedule, te):
    """p and w of the contract, written out with Python's math (the C library's sin/tan/pow)."""
    if schedule == "cosine":
        return 1.0 - math.sin((1.0 - te) * (math.pi / 2)), (math.pi / 2) / math.tan(te * (math.pi / 4))
    if schedule.startswith("polynomial:"):
        power = float(schedule.split(":")[1])
        return math.pow(te, power), power / te
    return te, 1.0 / te


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_rust_equals_reference_over_many_seeds(schedule):
    """Exact equality (masks, p, weights) for every seed: sin/tan/pow are the same libm on both sides."""
    x = _tokens(24, 40)
    pl = np.random.default_rng(5).integers(0, 41, size=24)
    for seed in range(120):
        kw = dict(seed=seed * 7919 + 3, step=seed, schedule=schedule, eps=[1e-3, 0.05, 1.0][seed % 3],
                  stratified=seed % 2 == 0, crop_prob=[0.0, 1.0][seed % 5 == 0])
        if seed % 4 == 1:
            kw.update(prompt_lens=pl, p_uncond=0.5)
        if seed % 6 == 5:
            kw.update(sample_offset=1000, global_batch=1100)
        _both(x.astype(DTYPES[seed % 3]), **kw)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 64), (40, 1024)])  # 40x1024: rayon path
def test_schedule_rust_equals_reference_shapes(schedule, shape):
    x = _tokens(*shape)
    _both(x, seed=2**63 + 5, step=17, crop_prob=0.0, schedule=schedule)
    _both(x, seed=1, step=18, stratified=True, crop_prob=0.0, schedule=schedule)


@settings(max_examples=100, deadline=None)
@given(
    B=st.integers(1, 6),
    L=st.integers(1, 70),
    seed=st.integers(0, 2**64 - 1),
    step=st.integers(0, 2**40),
    schedule=st.sampled_from(SCHEDULES + ["linear", "polynomial:1e-3", "polynomial:40"]),
    stratified=st.booleans(),
    crop=st.sampled_from([0.0, 1.0]),
    eps=st.sampled_from([1e-3, 0.1, 1.0]),
    p_uncond=st.sampled_from([0.0, 0.5]),
    data=st.data(),
)
def test_property_schedule_rust_equals_reference(B, L, seed, step, schedule, stratified, crop, eps, p_uncond,
                                                 data):
    x = _tokens(B, L, seed=seed % 97)
    pl = np.array(data.draw(st.lists(st.integers(0, L), min_size=B, max_size=B)), dtype=np.int64)
    _both(x, seed=seed, step=step, stratified=stratified, crop_prob=crop, eps=eps, prompt_lens=pl,
          p_uncond=p_uncond, schedule=schedule)


@pytest.mark.parametrize("schedule", SCHEDULES + ["linear"])
def test_schedule_p_and_weight_are_the_documented_formulas(schedule):
    B, L = 64, 256
    for eps in (1e-3, 0.2):
        noisy, mask, t, p, weight, _, _ = _both(_tokens(B, L), seed=3, step=1, crop_prob=0.0, eps=eps,
                                                schedule=schedule)
        te = (1 - eps) * t + eps  # the effective time, numpy float64 like the contract
        for i in range(B):
            want_p, want_w = _documented_p_w(schedule, float(te[i]))
            assert p[i] == want_p and 0 < p[i] <= 1
            np.testing.assert_array_equal(weight[i], np.where(mask[i], np.float32(want_w), np.float32(0)))
            token_key = np.uint64(rng.key(3, 1, i, rng.Stream.TOKEN))
            u = rng.uniform(rng.splitmix64(token_key ^ np.arange(L, dtype=np.uint64)))
            np.testing.assert_array_equal(mask[i], u < want_p)
        np.testing.assert_array_equal(noisy, np.where(mask, MASK, _tokens(B, L)))
    # cosine is 1 - cos(pi t'/2) (to rounding), polynomial t'^P
    if schedule == "cosine":
        np.testing.assert_allclose(p, 1 - np.cos(np.pi / 2 * te), rtol=0, atol=1e-15)
        np.testing.assert_allclose(diffusion.parse_schedule(schedule).weight(te),
                                   np.pi / 2 * np.sin(np.pi / 2 * te) / (1 - np.cos(np.pi / 2 * te)), rtol=1e-9)


def test_linear_schedule_is_today_and_power_one_is_linear():
    x = _tokens(16, 300)
    pl = np.arange(16) * 11
    kw = dict(seed=9, step=4, mask_id=MASK, prompt_lens=pl, p_uncond=0.3, crop_prob=1.0, stratified=True)
    default = _core.forward_process(x, **kw)
    _assert_same(_core.forward_process(x, **kw, schedule="linear"), default)
    _assert_same(_core.forward_process(x, **kw, schedule="polynomial:1"), default)
    _assert_same(forward_process_reference(x, **kw, schedule=diffusion.Schedule("linear")), default)
    np.testing.assert_array_equal(default[3], (1 - 1e-3) * default[2] + 1e-3)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_mask_fraction_matches_one_minus_alpha(schedule):
    """Per row, the masked fraction is within 5 sigma of p = 1 - alpha(t') (binomial, L draws); pooled over
    the batch within 4 sigma; and p itself is 1 - alpha(t') of the schedule's formula."""
    B, L = 64, 4096
    eps = 1e-3
    _, mask, t, p, *_ = _core.forward_process(_tokens(B, L), seed=7, step=0, mask_id=MASK, crop_prob=0.0,
                                              schedule=schedule, stratified=True)
    te = (1 - eps) * t + eps
    np.testing.assert_allclose(p, 1 - diffusion.alpha(torch.from_numpy(te), schedule).numpy(), rtol=1e-12,
                               atol=1e-15)
    frac = mask.mean(axis=1)
    sigma = np.sqrt(p * (1 - p) / L)
    assert np.all(np.abs(frac - p) <= 5 * sigma + 1e-12)
    assert abs(mask.mean() - p.mean()) <= 4 * np.sqrt(np.mean(p * (1 - p)) / (B * L))
    # the schedule matters: cosine and t'^2 mask less than linear at the same t, t'^0.5 more
    lin = (1 - eps) * t + eps
    if schedule in ("cosine", "polynomial:2", "polynomial:3.7"):
        assert np.all(p[lin < 0.99] < lin[lin < 0.99])
    else:
        assert np.all(p[lin < 0.99] > lin[lin < 0.99])


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_weights_bounded_by_w_eps(schedule):
    sched = diffusion.parse_schedule(schedule)
    for eps in (1e-3, 0.5, 1.0):
        _, mask, _, _, weight, *_ = _core.forward_process(_tokens(256, 64), seed=2, step=1, mask_id=MASK,
                                                          eps=eps, schedule=schedule)
        assert np.all(weight[~mask] == 0) and np.all(np.isfinite(weight))
        assert weight.max() <= np.float32(sched.weight(eps)) and weight[mask].min() >= np.float32(sched.weight(1.0))


def test_eps_one_masks_everything_for_every_schedule():
    for schedule in SCHEDULES:
        _, mask, _, p, *_ = _both(_tokens(4, 500), seed=1, step=0, eps=1.0, crop_prob=0.0, schedule=schedule)
        assert mask.all() and np.all(p == 1.0)


def test_schedule_api():
    ps = diffusion.parse_schedule
    assert ps("linear") == diffusion.Schedule("linear") and ps("cosine").name == "cosine"
    assert ps("polynomial") == ps("polynomial:2") == ps("polynomial:2.0") == diffusion.Schedule("polynomial", 2.0)
    for name in ("polynomial:0.5", "polynomial:1e-05", "polynomial:3.7", "polynomial:1e+16"):
        assert ps(ps(name).name) == ps(name)  # the canonical name round-trips (Rust parses it too)
        _core.forward_process(_tokens(1, 4), seed=0, step=0, mask_id=MASK, schedule=ps(name).name)
    sch = ps("cosine")
    assert ps(sch) is sch
    t = np.array([0.0, 0.25, 1.0])
    np.testing.assert_array_equal(sch.mask_prob(t), [sch.mask_prob(float(v)) for v in t])
    assert sch.mask_prob(0.0) == 0.0 and sch.mask_prob(1.0) == 1.0 and sch.alpha(1.0) == 0.0
    np.testing.assert_allclose(sch.alpha(torch.tensor(t)).numpy(), np.cos(np.pi / 2 * t), atol=1e-15)
    assert ps("polynomial:3").weight(0.5) == 6.0 and ps("polynomial:3").mask_prob(0.5) == 0.125
    assert diffusion.elbo_weight(0.5, "polynomial:3") == 6.0


BAD_SCHEDULES = ["nope", "Linear", "cos", "polynomial:", "polynomial:0", "polynomial:-1", "polynomial:nan",
                 "polynomial:inf", "polynomial:two", "polynomial: 2", "linear:2", ""]


@pytest.mark.parametrize("name", BAD_SCHEDULES)
def test_bad_schedule_names(name, monkeypatch):
    msg = f"unknown schedule '{name}'"
    with pytest.raises(ValueError, match=msg):
        diffusion.parse_schedule(name)
    with pytest.raises(ValueError, match=msg):  # straight into Rust: its own check, no panic
        _core.forward_process(_tokens(2, 10), seed=0, step=0, mask_id=MASK, schedule=name)
    with pytest.raises(ValueError, match="forward_process: " + msg):
        forward_process(_tokens(2, 10), seed=0, step=0, mask_id=MASK, schedule=name)
    monkeypatch.setenv("SMDM_KERNELS", "reference")
    with pytest.raises(ValueError, match="forward_process: " + msg):
        forward_process(_tokens(2, 10), seed=0, step=0, mask_id=MASK, schedule=name)
    with pytest.raises(ValueError, match=msg):
        forward_process_reference(_tokens(2, 10), seed=0, step=0, mask_id=MASK, schedule=name)


def test_bad_schedule_types():
    with pytest.raises(ValueError, match="unknown schedule 3"):
        diffusion.parse_schedule(3)
    with pytest.raises(TypeError):  # pyo3's conversion error, not a panic
        _core.forward_process(_tokens(2, 10), seed=0, step=0, mask_id=MASK, schedule=3)


@pytest.mark.parametrize("name", ["polynomial:0.5", "polynomial:3"])
def test_polynomial_weights_are_minus_dalpha_over_one_minus_alpha(name):
    t = np.linspace(0.01, 0.99, 99)
    h = 1e-6
    dalpha = (diffusion.alpha(t + h, name) - diffusion.alpha(t - h, name)) / (2 * h)
    np.testing.assert_allclose(diffusion.elbo_weight(t, name), -dalpha / (1 - diffusion.alpha(t, name)),
                               rtol=1e-6)


def test_splitmix64_wraps_for_every_input_kind():
    """The numpy reference equals the Rust function and the Python-int path for arrays of any rank, 0-d
    included (a 0-d array used to become a numpy scalar whose wrapping multiply warned: an error here)."""
    from smdm import _core

    xs = [0, 1, 2**63 + 5, 2**64 - 1, 0x9E3779B97F4A7C15]
    for x in xs:
        want = _core.splitmix64(x)
        assert rng.splitmix64(x) == want
        assert int(rng.splitmix64(np.array(x, dtype=np.uint64))) == want  # 0-d
        assert int(rng.splitmix64(np.array([x], dtype=np.uint64))[0]) == want
    assert int(rng.key(np.uint64(3), 2**64 - 1)) == rng.key(3, 2**64 - 1)

# python -m pytest -q tests/test_kernels.py     (GPU part: python -m pytest -q -m gpu tests/test_kernels.py)
"""smdm.kernels: the PyTorch references against naive loops, argument validation, torch.library fake
registrations, the build machinery and the compile check (CPU); the CUDA kernels against the references
(`-m gpu`, skipped without CUDA)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from smdm import kernels as K
from smdm import rng
from smdm.kernels import _build
from smdm.kernels import _reference as R

CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu


# ------------------------------------------------------------------------------------------------------------
# RNG and deterministic math
# ------------------------------------------------------------------------------------------------------------
def test_splitmix_and_keys_match_rng():
    x = torch.tensor([0, 1, 12345, -5, 2**62, -(2**63), 2**63 - 1], dtype=torch.int64)
    got = R.splitmix64_t(x).numpy().view(np.uint64)
    assert (got == rng.splitmix64(x.numpy().view(np.uint64))).all()
    seeds, pos = torch.tensor([7, 2**40, -3]), torch.tensor([5, 100, 0])
    keys = R.gumbel_keys(seeds, 3, pos).tolist()
    want = [rng.key(s & (2**64 - 1), 3, p, rng.Stream.GUMBEL) for s, p in zip(seeds.tolist(), pos.tolist())]
    assert [k & (2**64 - 1) for k in keys] == want


def test_log_exp_are_accurate_and_exact_at_special_points():
    x = torch.rand(200_000, dtype=torch.float64).float() * 30 + 1e-30
    ref = torch.log(x.double())
    assert ((R.log_f32(x).double() - ref).abs() <= 4e-7 * ref.abs().clamp(min=1e-3)).all()
    z = -torch.rand(200_000).float() * 80
    refe = torch.exp(z.double())
    assert ((R.exp_neg_f32(z).double() - refe).abs() <= 3e-7 * refe).all()
    assert R.log_f32(torch.tensor([1.0, 0.0, -0.0])).tolist() == [0.0, -math.inf, -math.inf]
    assert R.exp_neg_f32(torch.tensor([0.0, -80.5, -math.inf])).tolist() == [1.0, 0.0, 0.0]


def test_fixed_point_terms_vanish_below_the_kernel_cutoffs():
    # the kernel skips exp for z < -21.5 (z < -26 with the entropy sum): every float32 there adds exactly 0
    lo = torch.tensor([-21.5]).view(torch.int32).item()
    hi = torch.tensor([-80.0]).view(torch.int32).item()
    z = (
        torch.arange(lo + 1, hi + 1, dtype=torch.int64).to(torch.int32).view(torch.float32)
    )  # all of [-80, -21.5)
    e = R.exp_neg_f32(z)
    assert R.fixed31(e).max() == 0
    deep = z < -26.0
    assert R.fixed31(-(e[deep] * z[deep])).max() == 0


def test_gumbel_noise_follows_the_contract():
    keys = R.gumbel_keys(torch.tensor([11, 12]), 4, torch.tensor([3, 9]))
    g = R.gumbel_noise(keys, 300)
    for n in range(2):
        for v in (0, 1, 157, 299):
            h = rng.splitmix64(int(keys[n]) & (2**64 - 1) ^ v)
            u = np.float32((np.float32(h >> 41) + np.float32(0.5)) * np.float32(2.0**-23))
            want = -math.log(-math.log(float(u)))
            assert abs(float(g[n, v]) - want) <= 1e-5 * max(1.0, abs(want))
    # the extreme draws stay strictly inside (0, 1): g is finite at both ends (24 bits would round to u == 1)
    assert float((torch.tensor([2.0**24 - 1]) + 0.5) * 2.0**-24) == 1.0  # why the contract takes 23 bits
    k = torch.tensor([0.0, 2.0**23 - 1])
    u = (k + 0.5) * 2.0**-23
    assert 0.0 < float(u[0]) and float(u[1]) < 1.0
    g = -R.log_f32(-R.log_f32(u))
    assert torch.isfinite(g).all() and float(g.max()) < 16.7


# ------------------------------------------------------------------------------------------------------------
# unmask_step_reference against a per-row Python loop
# ------------------------------------------------------------------------------------------------------------
def _loop_row(lv, seed, step, pos, T, top_k, top_p, conf):
    """Token and confidence of one row in float64 with Python sorting (an independent implementation)."""
    V = len(lv)
    order = sorted(range(V), key=lambda v: (-lv[v], v))
    keep = set(order[:top_k] if 0 < top_k < V else order)
    if top_p < 1.0:
        kept = [v for v in order if v in keep]
        m = lv[kept[0]]
        w = [math.exp(lv[v] - m) for v in kept]
        s, acc, out = sum(w), 0.0, []
        for v, wv in zip(kept, w):
            out.append(v)
            acc += wv
            if acc >= top_p * s:
                break
        keep = set(out)
    if T == 0:
        tok = order[0]
    else:
        base = rng.key(seed & (2**64 - 1), step, pos, rng.Stream.GUMBEL)
        best = None
        for v in sorted(keep):
            h = rng.splitmix64(base ^ v)
            u = float(np.float32(np.float32(h >> 41) + np.float32(0.5)) * np.float32(2.0**-23))
            score = float(np.float32(lv[v]) / np.float32(T)) + -math.log(-math.log(u))
            if best is None or score > best[0]:
                best = (score, v)
        tok = best[1]
    m = max(lv[v] for v in keep)
    p = {v: math.exp(lv[v] - m) for v in keep}
    s = sum(p.values())
    if conf == "prob":
        c = p[tok] / s
    elif conf == "margin":
        ps = sorted(p.values(), reverse=True) + [0.0]
        c = (ps[0] - ps[1]) / s
    else:
        c = sum(q / s * math.log(q / s) for q in p.values() if q > 0)
    return tok, c


def _loop_commit(conf, cand, n=None, tau=None):
    out = []
    for b in range(len(conf)):
        idx = [j for j in range(len(conf[b])) if cand[b][j]]
        ranked = sorted(idx, key=lambda j: (-conf[b][j], j))
        if n is not None:
            chosen = set(ranked[: n[b]])
        else:
            chosen = {j for j in idx if conf[b][j] >= tau} | set(ranked[:1])
        out.append([j in chosen for j in range(len(conf[b]))])
    return out


@pytest.mark.parametrize(
    "T,top_k,top_p,conf,cfg",
    [
        (0.0, 0, 1.0, "prob", 0.0),
        (1.0, 0, 1.0, "prob", 0.0),
        (0.7, 5, 1.0, "margin", 0.0),
        (1.3, 0, 0.8, "neg_entropy", 1.5),
        (1.0, 20, 0.5, "prob", 0.5),
        (2.0, 1, 1.0, "margin", 0.0),
    ],
)
def test_unmask_reference_matches_row_loop(T, top_k, top_p, conf, cfg):
    g = torch.Generator().manual_seed(1)
    B, L, V = 3, 7, 64
    logits = torch.randn(B, L, V, generator=g) * 3
    uncond = torch.randn(B, L, V, generator=g) * 3 if cfg else None
    cand = torch.rand(B, L, generator=g) < 0.6
    cand[:, 0] = True
    seeds = torch.tensor([5, -9, 2**40])
    tokens = torch.full((B, L), 999, dtype=torch.int64)
    before = tokens.clone()
    n = torch.tensor([2, 0, 100])
    pred, c, committed = R.unmask_step_reference(
        logits,
        tokens,
        cand,
        seeds,
        17,
        uncond_logits=uncond,
        cfg_scale=cfg,
        temperature=T,
        top_k=top_k,
        top_p=top_p,
        confidence=conf,
        n_commit=n,
        position_offset=4,
    )
    guided = logits if uncond is None else uncond + (cfg + 1) * (logits - uncond)
    for b in range(B):
        for j in range(L):
            if not cand[b, j]:
                assert pred[b, j] == -1 and c[b, j] == -math.inf
                continue
            tok, cv = _loop_row(guided[b, j].tolist(), int(seeds[b]), 17, 4 + j, T, top_k, top_p, conf)
            assert int(pred[b, j]) == tok, (b, j)
            assert abs(float(c[b, j]) - cv) <= 5e-5 * max(1.0, abs(cv)), (b, j, float(c[b, j]), cv)
    want = _loop_commit(c.tolist(), cand.tolist(), n=n.tolist())
    assert committed.tolist() == want
    assert torch.equal(tokens, torch.where(committed, pred, before))


def test_commit_rules_ties_threshold_and_limits():
    conf = torch.tensor([[0.5, 0.9, 0.9, 0.1, 0.9], [0.2, 0.3, 0.1, 0.3, 0.0]])
    cand = torch.tensor([[True, True, True, True, False], [True, False, True, True, True]])
    got = R.select_positions_reference(conf, cand, n=torch.tensor([2, 9]))
    assert got.tolist() == [[False, True, True, False, False], [True, False, True, True, True]]
    got = R.select_positions_reference(conf, cand, threshold=0.95)  # nobody reaches tau: the best one anyway
    assert got.tolist() == [[False, True, False, False, False], [False, False, False, True, False]]
    got = R.select_positions_reference(conf, cand, threshold=0.25)
    assert got.tolist() == [[True, True, True, False, False], [False, False, False, True, False]]
    empty = torch.zeros_like(cand)
    assert not R.select_positions_reference(conf, empty, threshold=0.0).any()
    assert not R.select_positions_reference(conf, empty, n=torch.tensor([3, 3])).any()


def test_commit_ranks_candidates_first_in_torch_sort_order():
    # candidates rank above every other position even at confidence -inf; NaN ranks first and -0 == +0 tie
    # (torch.sort / torch.argmax order, which the CUDA commit kernel reproduces with its integer keys)
    sampling = pytest.importorskip("smdm.sampling")
    inf, nan = math.inf, math.nan
    conf = torch.tensor(
        [
            [-inf, 0.2, -inf, -inf, 0.1],
            [0.3, nan, 0.5, nan, 0.0],
            [-0.0, 0.0, -0.0, 0.0, -1.0],
            [-inf, -inf, -inf, -inf, -inf],
        ]
    )
    cand = torch.tensor(
        [
            [False, True, True, True, True],
            [True, True, True, False, True],
            [True, True, True, True, True],
            [False, False, True, True, False],
        ]
    )
    n = torch.tensor([3, 2, 3, 1])

    def rows(*sets):
        return [[j in s for j in range(5)] for s in sets]

    want_n = rows({1, 4, 2}, {1, 2}, {0, 1, 2}, {2})
    want_t = rows({1}, {0, 1, 2}, {0}, {2})
    assert R.select_positions_reference(conf, cand, n=n).tolist() == want_n
    assert R.select_positions_reference(conf, cand, threshold=0.15).tolist() == want_t
    assert sampling.select_positions(conf, cand, n=n).tolist() == want_n
    assert sampling.select_positions(conf, cand, threshold=0.15).tolist() == want_t
    # the fused step commits the same way (confidences of the rows do not matter here: the count rule only
    # sees the ranking; a row of -inf logits gives NaN confidence, which ranks first)
    logits = torch.full((1, 4, 6), -inf)
    logits[0, 1:] = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    tokens = torch.zeros(1, 4, dtype=torch.int64)
    pred, c, committed = R.unmask_step_reference(
        logits, tokens, torch.ones(1, 4, dtype=torch.bool), torch.tensor([1]), 0, n_commit=torch.tensor([1])
    )
    assert c[0, 0].isnan() and committed.tolist() == [[True, False, False, False]] and pred[0, 0] == 0


def test_sampler_kernel_limits_route_to_reference():
    assert K._smem_unsupported(torch.empty(0), K.UNMASK_MAX_N + 1, "V") is not None
    src = (_build.source_dir() / "unmask_sampler.cuh").read_text()
    assert f"UNMASK_MAX_N = {K.UNMASK_MAX_N};" in src


def test_reference_is_batch_invariant_and_uses_absolute_positions():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 6, 50, generator=g)
    cand = torch.ones(4, 6, dtype=torch.bool)
    seeds = torch.tensor([1, 2, 3, 4])
    kw = dict(temperature=1.0, top_p=0.9, n_commit=torch.tensor([2, 2, 2, 2]))
    full = R.unmask_step_reference(logits, torch.zeros(4, 6, dtype=torch.int64), cand, seeds, 3, **kw)
    one = R.unmask_step_reference(
        logits[2:3],
        torch.zeros(1, 6, dtype=torch.int64),
        cand[2:3],
        seeds[2:3],
        3,
        **{**kw, "n_commit": kw["n_commit"][:1]},
    )
    for a, b in zip(full, one):
        assert torch.equal(a[2:3], b)
    # a column slice with position_offset draws exactly what the full row draws at those positions
    tail = R.unmask_step_reference(
        logits[:, 2:], torch.zeros(4, 4, dtype=torch.int64), cand[:, 2:], seeds, 3, position_offset=2, **kw
    )
    assert torch.equal(tail[0], full[0][:, 2:]) and torch.equal(tail[1], full[1][:, 2:])


def test_choose_tokens_equals_unmask_rows():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 40, generator=g)
    cand = torch.ones(2, 5, dtype=torch.bool)
    pred, conf, _ = R.unmask_step_reference(
        logits,
        torch.zeros(2, 5, dtype=torch.int64),
        cand,
        torch.tensor([8, 9]),
        6,
        temperature=0.9,
        top_k=10,
        confidence="margin",
        threshold=0.5,
    )
    tok, c = K.choose_tokens(
        logits.reshape(10, 40),
        seeds=torch.tensor([8] * 5 + [9] * 5),
        positions=torch.arange(5).repeat(2),
        step=6,
        temperature=0.9,
        top_k=10,
        confidence="margin",
    )
    assert torch.equal(tok, pred.reshape(-1)) and torch.equal(c, conf.reshape(-1))


def test_choose_tokens_agrees_with_smdm_sampling_reference():
    sampling = pytest.importorskip("smdm.sampling")
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(64, 500, generator=g) * 2
    kw = dict(seeds=torch.arange(64), positions=torch.arange(64) + 3, step=2)
    for opts in ({"temperature": 0.0}, {"temperature": 1.0}, {"temperature": 0.8, "top_k": 40, "top_p": 0.9}):
        t1, c1 = K.choose_tokens(logits, **kw, **opts)
        t2, c2 = sampling.choose_tokens(logits, **kw, **opts)
        assert torch.equal(t1, t2), opts
        assert torch.allclose(c1, c2, rtol=2e-5, atol=1e-6), opts


# ------------------------------------------------------------------------------------------------------------
# attention_reference against an explicit softmax loop
# ------------------------------------------------------------------------------------------------------------
def test_attention_reference_matches_explicit_softmax():
    g = torch.Generator().manual_seed(5)
    B, Hq, Hkv, Lq, Lk, D = 2, 4, 2, 5, 8, 16
    q = torch.randn(B, Hq, Lq, D, generator=g)
    k = torch.randn(B, Hkv, Lk, D, generator=g)
    v = torch.randn(B, Hkv, Lk, D, generator=g)
    qs = torch.tensor([[0, 0, 1, 1, 7], [0, 0, 0, 0, 0]], dtype=torch.int32)
    ks = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2], [0, 0, 0, 0, 0, 1, 1, 1]], dtype=torch.int32)
    out = R.attention_reference(q, k, v, q_segment_ids=qs, k_segment_ids=ks, scale=0.3)
    for b in range(B):
        for h in range(Hq):
            for i in range(Lq):
                js = [j for j in range(Lk) if qs[b, i] == ks[b, j]]
                if not js:
                    assert torch.all(out[b, h, i] == 0)
                    continue
                s = [0.3 * float(q[b, h, i] @ k[b, h // 2, j]) for j in js]
                m = max(s)
                w = [math.exp(x - m) for x in s]
                want = sum(wj / sum(w) * v[b, h // 2, j] for wj, j in zip(w, js))
                assert torch.allclose(out[b, h, i], want, atol=1e-5)
    plain = R.attention_reference(q[:, :2], k, v)
    want = torch.softmax(q[:, :2] @ k.transpose(-1, -2) / 4.0, -1) @ v
    assert torch.allclose(plain, want, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# validation and backend choice
# ------------------------------------------------------------------------------------------------------------
def _args(B=2, L=3, V=10):
    return (
        torch.randn(B, L, V),
        torch.zeros(B, L, dtype=torch.int64),
        torch.ones(B, L, dtype=torch.bool),
        torch.zeros(B, dtype=torch.int64),
        0,
    )


@pytest.mark.parametrize(
    "change,value,extra,err,match",
    [
        (0, torch.randn(2, 3), {}, ValueError, "logits must be a"),
        (0, torch.zeros(2, 3, 10, dtype=torch.int64), {}, TypeError, "float32, bfloat16"),
        (1, torch.zeros(2, 3, dtype=torch.int32), {}, TypeError, "tokens must have dtype"),
        (2, torch.ones(2, 4, dtype=torch.bool), {}, ValueError, "candidates must have shape"),
        (3, torch.zeros(3, dtype=torch.int64), {}, ValueError, "seeds must have shape"),
        (1, torch.zeros(1, 3, dtype=torch.int64).expand(2, 3), {}, ValueError, "tokens rows overlap"),
        (1, torch.zeros(2, 1, dtype=torch.int64).expand(2, 3), {}, ValueError, "tokens rows overlap"),
        (None, None, {"threshold": 0.5}, ValueError, "exactly one of n_commit"),
        (None, None, {"top_p": 1.5}, ValueError, "top_p"),
        (None, None, {"top_k": -1}, ValueError, "top_k"),
        (None, None, {"temperature": -1.0}, ValueError, "temperature"),
        (None, None, {"confidence": "entropyy"}, ValueError, "confidence must be"),
        (None, None, {"backend": "cuda"}, ValueError, "needs CUDA tensors"),
        (None, None, {"backend": "gpu"}, ValueError, "backend must be one of"),
        (None, None, {"uncond_logits": torch.randn(2, 3, 11)}, ValueError, "uncond_logits shape"),
    ],
)
def test_unmask_step_validation(change, value, extra, err, match):
    args = list(_args())
    if change is not None:
        args[change] = value
    kw = {"n_commit": torch.ones(2, dtype=torch.int64), **extra}  # + threshold: both given
    with pytest.raises(err, match=match):
        K.unmask_step(*args, **kw)


def test_attention_validation():
    q = torch.randn(1, 3, 4, 8)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        K.attention(q, torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
    with pytest.raises(ValueError, match="same shape"):
        K.attention(q, torch.randn(1, 3, 4, 8), torch.randn(1, 3, 5, 8))
    with pytest.raises(ValueError, match="both q_segment_ids"):
        K.attention(q, q, q, q_segment_ids=torch.zeros(1, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="must have shape"):
        K.attention(q, q, q, segment_ids=torch.zeros(1, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        K.attention(q, q, q, backend="cuda")


def test_env_forces_reference_and_rejects_bad_values(monkeypatch):
    monkeypatch.setenv("SMDM_KERNELS", "reference")
    args = _args()
    out = K.unmask_step(*args, n_commit=torch.ones(2, dtype=torch.int64))
    assert out[0].shape == (2, 3)
    monkeypatch.setenv("SMDM_KERNELS", "bogus")
    with pytest.raises(ValueError, match="SMDM_KERNELS must be one of"):
        K.unmask_step(*args, n_commit=torch.ones(2, dtype=torch.int64))


def test_public_ops_on_cpu_equal_references():
    args = _args(V=30)
    t1, t2 = args[1].clone(), args[1].clone()
    a = K.unmask_step(args[0], t1, *args[2:], temperature=1.0, n_commit=torch.ones(2, dtype=torch.int64))
    b = R.unmask_step_reference(
        args[0], t2, *args[2:], temperature=1.0, n_commit=torch.ones(2, dtype=torch.int64)
    )
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and torch.equal(t1, t2)
    q = torch.randn(1, 2, 5, 8)
    assert torch.equal(K.attention(q, q, q), R.attention_reference(q, q, q))


# ------------------------------------------------------------------------------------------------------------
# torch.library registrations: fake tensors, tracing, opcheck (CPU implementation = the reference)
# ------------------------------------------------------------------------------------------------------------
def test_fake_registrations_trace_without_running():
    import smdm.kernels._ops  # noqa: F401
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    with FakeTensorMode():
        logits = torch.empty(2, 3, 50, dtype=torch.bfloat16)
        tokens = torch.empty(2, 3, dtype=torch.int64)
        cand = torch.empty(2, 3, dtype=torch.bool)
        seeds = torch.empty(2, dtype=torch.int64)
        pred, conf, comm = torch.ops.smdm.unmask_step(
            logits, None, cand, seeds, tokens, seeds, 0, 0, 0.0, 1.0, 0, 1.0, 0, 0.0
        )
        assert (pred.shape, pred.dtype, conf.dtype, comm.dtype) == (
            (2, 3),
            torch.int64,
            torch.float32,
            torch.bool,
        )
        q = torch.empty(1, 4, 128, 64, dtype=torch.float16)
        out = torch.ops.smdm.attention(q, q[:, :2], q[:, :2], None, None, 0.125)
        assert out.shape == q.shape and out.dtype == q.dtype
        tok, c = torch.ops.smdm.choose_tokens(
            logits[0], seeds.new_empty(3), seeds.new_empty(3), seeds.new_empty(3), 1.0, 0, 1.0, 0
        )
        assert tok.shape == (3,) and c.dtype == torch.float32

    def f(q, k, v):
        return torch.ops.smdm.attention(q, k, v, None, None, 0.5) * 2

    gm = make_fx(f, tracing_mode="fake")(
        torch.randn(1, 2, 8, 64), torch.randn(1, 2, 8, 64), torch.randn(1, 2, 8, 64)
    )
    assert "smdm.attention" in str(gm.graph)


def test_opcheck_and_compile_on_cpu():
    import smdm.kernels._ops  # noqa: F401

    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 6, 16, generator=g) for _ in range(3))
    torch.library.opcheck(torch.ops.smdm.attention.default, (q, k, v, None, None, 0.25))
    logits = torch.randn(2, 4, 20, generator=g)
    args = (
        logits,
        None,
        torch.ones(2, 4, dtype=torch.bool),
        torch.tensor([1, 2]),
        torch.zeros(2, 4, dtype=torch.int64),
        torch.tensor([1, 2]),
        3,
        0,
        0.0,
        1.0,
        0,
        1.0,
        0,
        0.0,
    )
    torch.library.opcheck(torch.ops.smdm.unmask_step.default, args)
    compiled = torch.compile(
        lambda q, k, v: torch.ops.smdm.attention(q, k, v, None, None, 0.25), backend="eager", fullgraph=True
    )
    assert torch.allclose(compiled(q, k, v), R.attention_reference(q, k, v, scale=0.25))
    public = torch.compile(lambda q: K.attention(q, q, q) * 2, backend="eager", fullgraph=True)
    assert torch.allclose(public(q), R.attention_reference(q, q, q) * 2)


def test_op_outputs_have_the_fake_strides_on_every_branch():
    """Every torch.ops.smdm.* output has the strides of its fake implementation (contiguous), the reference
    branch included: inductor asserts them at run time ("AssertionError: expected size 3==3, stride 1==4 ...
    Error in op: torch.ops.smdm.unmask_step.default"), and `candidates & ...` of a transposed `candidates`
    used to come back transposed from the reference."""
    import smdm.kernels._ops as O

    g = torch.Generator().manual_seed(8)
    B, L, V = 3, 4, 11
    logits = torch.randn(B, L, V, generator=g)
    cand = (torch.rand(L, B, generator=g) < 0.7).t()  # (B, L), not contiguous
    seeds, n = torch.arange(B), torch.full((B,), 2)
    conf = torch.rand(L, B, generator=g).t()
    q = torch.randn(1, 5, 2, 8, generator=g).transpose(1, 2)  # (B, H, L, D) view of (B, L, H, D)
    calls = [
        (O.unmask_step_op, O._unmask_step_fake,
         (logits, None, cand, seeds, torch.zeros(B, L, dtype=torch.int64), n, 0, 0, 0.0, 1.0, 0, 0.9, 0, 0.0)),
        (O.choose_tokens_op, O._choose_tokens_fake,
         (logits.reshape(-1, V)[::2], *(torch.arange(B * L // 2),) * 3, 1.0, 3, 1.0, 0)),
        (O.select_positions_op, O._select_positions_fake, (conf, cand, n, 0.0)),
        (O.attention_op, O._attention_fake, (q, q, q, None, None, 0.5)),
    ]
    for op, fake, args in calls:
        got, want = op(*args, backend="reference"), fake(*args)
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        for a, b in zip(got, want):
            assert (a.shape, a.stride(), a.dtype) == (b.shape, b.stride(), b.dtype), op


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_public_sampler_functions_compile_fullgraph_on_cpu(compiler):
    """torch.compile(fullgraph=True) over the public sampler functions on CPU tensors: they trace into the
    registered op (CPU implementation = the reference) instead of the reference's data-dependent shapes
    (`nonzero()`), and give the eager results, the in-place update of a column slice of `tokens` included."""
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(2, 4, 20, generator=g)
    cand = torch.tensor([[True, False, True, True], [True, True, True, False]])
    seeds, n = torch.tensor([1, 2]), torch.tensor([1, 2])

    def step(logits, buf):
        return K.unmask_step(logits, buf[:, 2:6], cand, seeds, 3, temperature=1.0, top_p=0.9, n_commit=n,
                             position_offset=2)

    def choose(rows):
        return K.choose_tokens(rows, seeds=3, positions=torch.arange(8), step=1, temperature=1.0, top_k=5)

    def select(conf):
        return K.select_positions(conf, conf > 0.2, n=2), K.select_positions(conf, conf > 0.2, threshold=0.5)

    buf_c, buf_e = torch.zeros(2, 7, dtype=torch.int64), torch.zeros(2, 7, dtype=torch.int64)
    conf = torch.rand(2, 6, generator=g)
    cases = [(step, (logits, buf_c), (logits, buf_e)), (choose, (logits.reshape(8, 20),), None),
             (select, (conf,), None)]
    for fn, args, eager_args in cases:
        got = torch.compile(fn, backend=compiler, fullgraph=True)(*args)
        want = fn(*(eager_args or args))
        assert all(torch.equal(a, b) for a, b in zip(got, want)), fn.__name__
    assert torch.equal(buf_c, buf_e) and buf_c[:, 2:6].ne(0).any()
    assert buf_c[:, :2].eq(0).all() and buf_c[:, 6:].eq(0).all()


def test_compiled_backend_choice_is_made_when_the_op_runs(monkeypatch):
    """While torch.compile traces, backend="auto" must not pick the kernel unbuilt (a failed build then raised
    at run time): the call resolves to "auto" and the op, when it runs, builds and falls back to the reference
    on a failed build or an unsupported call (a misaligned q/k/v start address, invisible while tracing);
    "cuda" raises the eager errors there instead."""
    import smdm.kernels._ops as O

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_build, "_module", None)
    monkeypatch.setattr(_build, "_module_error", K.KernelBuildError("nvcc exploded"))
    monkeypatch.setattr(K, "_warned_fallback", False)
    monkeypatch.delenv("SMDM_KERNELS", raising=False)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert K._resolve_backend("auto", True, None) == "auto"  # not "cuda", and no build while tracing
    assert K._resolve_backend("cuda", True, None) == "cuda"
    assert K._resolve_backend("auto", True, "head dim 32") == "reference"
    assert K._resolve_backend("auto", False, None) == "reference"
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        K._resolve_backend("cuda", False, None)
    q = torch.zeros(64 * 2 + 1, dtype=torch.bfloat16)[1:].view(1, 1, 2, 64)  # start 2 bytes off alignment
    assert K._attention_unsupported(q, q, q) is None  # the address is unknown while tracing...
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert K._attention_unsupported(q, q, q) == K.ALIGNMENT_MESSAGE  # ...and checked when the op runs
    # the op at run time
    with pytest.warns(RuntimeWarning, match="using the PyTorch reference: nvcc exploded"):
        assert O._use_kernel("auto", True) is False
    with pytest.raises(K.KernelBuildError, match="nvcc exploded"):
        O._use_kernel("cuda", True)
    assert O._use_kernel("auto", True, K.ALIGNMENT_MESSAGE) is False
    with pytest.raises(ValueError, match="16-byte aligned"):
        O._use_kernel("cuda", True, K.ALIGNMENT_MESSAGE)
    assert O._use_kernel("reference", True) is False and O._use_kernel("cuda", False) is False
    monkeypatch.setattr(_build, "_module", object())  # a built kernel module
    assert O._use_kernel("auto", True) is True and O._use_kernel("cuda", True) is True
    monkeypatch.setenv("SMDM_KERNELS", "reference")
    assert O._use_kernel("auto", True) is False


def test_available_is_false_when_the_env_forces_the_reference(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_build, "_module", object())  # built: the kernels could run
    monkeypatch.delenv("SMDM_KERNELS", raising=False)
    assert K.available() is True
    monkeypatch.setenv("SMDM_KERNELS", "cuda")
    assert K.available() is True
    monkeypatch.setenv("SMDM_KERNELS", "reference")
    assert K.available() is False  # backend="auto" (and the model's attention="auto") will not use them
    monkeypatch.setenv("SMDM_KERNELS", "bogus")
    with pytest.raises(ValueError, match="SMDM_KERNELS must be one of"):
        K.available()


# ------------------------------------------------------------------------------------------------------------
# build machinery and compile check
# ------------------------------------------------------------------------------------------------------------
def test_sources_are_found_and_nvrtc_compatible():
    src = K.source_dir()
    for name in (*_build.KERNEL_HEADERS, _build.NVRTC_UNIT, *_build.LAUNCHERS, _build.BINDINGS):
        assert (src / name).is_file(), name
    for name in (*_build.KERNEL_HEADERS, _build.NVRTC_UNIT):  # kernel sources: no host / torch / half headers
        includes = [ln for ln in (src / name).read_text().splitlines() if ln.startswith("#include")]
        assert all('"' in ln for ln in includes), (name, includes)  # only our own headers


def test_cache_dir_and_missing_sources(monkeypatch, tmp_path):
    monkeypatch.setenv("SMDM_CACHE_DIR", str(tmp_path / "c"))
    assert _build.cache_root() == tmp_path / "c"
    monkeypatch.delenv("SMDM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _build.cache_root() == tmp_path / "smdm" / "kernels"
    monkeypatch.setenv("SMDM_CSRC", str(tmp_path / "nowhere"))
    assert K.source_dir() != tmp_path / "nowhere"  # falls through to the checkout / package copy


@pytest.mark.skipif(CUDA, reason="checks the error raised without a GPU")
def test_explicit_kernel_request_without_gpu_raises_clearly():
    _build._module = None
    _build._module_error = None
    with pytest.raises(K.KernelBuildError, match="need a CUDA device"):
        K.build()
    assert K.available() is False


def test_every_build_failure_is_a_kernel_build_error(monkeypatch, tmp_path):
    """An NVRTC compile error (CuPy's own exception type) or an unusable cache directory must surface as
    KernelBuildError: `available()` and backend="auto" catch only that and fall back; anything else crashed
    the caller (e.g. the model's attention="auto") instead."""
    import sys
    import types

    class CompileException(Exception):  # stands in for cupy.cuda.compiler.CompileException
        pass

    class RawModule:
        def __init__(self, **kw):
            pass

        def compile(self):
            raise CompileException("kernels.cu(12): error: identifier is undefined")

    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(RawModule=RawModule))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_build, "find_cuda_home", lambda: None)
    monkeypatch.setattr(_build, "_module", None)
    monkeypatch.setattr(_build, "_module_error", None)
    monkeypatch.setattr(K, "_warned_fallback", False)
    with pytest.raises(K.KernelBuildError, match="identifier is undefined"):
        K.build()
    assert K.available() is False
    with pytest.warns(RuntimeWarning, match="using the PyTorch reference"):
        assert K._resolve_backend("auto", True, None) == "reference"

    monkeypatch.undo()
    _need_nvcc()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_build, "device_archs", lambda: ["sm_90a"])
    monkeypatch.setattr(_build, "_module", None)
    monkeypatch.setattr(_build, "_module_error", None)
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("SMDM_CACHE_DIR", str(tmp_path / "file" / "cache"))  # cannot be created
    with pytest.raises(K.KernelBuildError, match="cache"):
        K.build()


def _fake_cupy(monkeypatch):
    import sys
    import types

    class RawModule:
        def __init__(self, **kw):
            pass

        def compile(self):
            pass

    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(RawModule=RawModule))


def test_build_path_switch(monkeypatch):
    """SMDM_KERNEL_BUILD=auto|nvcc|nvrtc: auto = nvcc when a toolkit is found, else NVRTC; nvrtc even where
    nvcc exists; nvcc never falls back to NVRTC; anything else is a ValueError naming the variable. A failed
    build is final for its mode only: switching the mode retries (the GPU suite's NVRTC fallback)."""
    from smdm.kernels._nvrtc import NvrtcModule

    calls = []

    def nvcc_build(src, home, verbose):
        calls.append(home)
        if os.environ.get("FAKE_NVCC_FAILS"):
            raise K.KernelBuildError("nvcc exploded")
        return "nvcc-module"

    def fresh(mode, home):
        monkeypatch.setattr(_build, "_module", None)
        monkeypatch.setattr(_build, "_module_error", None)
        monkeypatch.setattr(_build, "find_cuda_home", lambda: home)
        if mode is None:
            monkeypatch.delenv("SMDM_KERNEL_BUILD", raising=False)
        else:
            monkeypatch.setenv("SMDM_KERNEL_BUILD", mode)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_build, "_build_nvcc", nvcc_build)
    monkeypatch.delenv("SMDM_KERNELS", raising=False)
    monkeypatch.delenv("FAKE_NVCC_FAILS", raising=False)
    _fake_cupy(monkeypatch)
    toolkit = Path("/opt/fake-cuda")
    for mode in (None, "auto", " Auto "):
        fresh(mode, toolkit)
        assert K.build() == "nvcc-module" and calls[-1] == toolkit
        fresh(mode, None)
        assert isinstance(K.build(), NvrtcModule)
    fresh("nvrtc", toolkit)
    n = len(calls)
    assert isinstance(K.build(), NvrtcModule) and len(calls) == n  # nvcc exists but is not used
    fresh("nvcc", toolkit)
    assert K.build() == "nvcc-module"
    fresh("nvcc", None)
    with pytest.raises(K.KernelBuildError, match="SMDM_KERNEL_BUILD=nvcc but no CUDA toolkit"):
        K.build()
    assert K.available() is False
    fresh("nvrtc", toolkit)
    monkeypatch.setitem(__import__("sys").modules, "cupy", None)  # CuPy not installed
    with pytest.raises(K.KernelBuildError, match="SMDM_KERNEL_BUILD=nvrtc but CuPy is not installed"):
        K.build()
    _fake_cupy(monkeypatch)
    fresh("cuda", toolkit)
    for fn in (K.build, K.available):
        with pytest.raises(ValueError, match=r"SMDM_KERNEL_BUILD must be one of auto, nvcc, nvrtc .*'cuda'"):
            fn()
    # a failed nvcc build is remembered for its mode; switching to nvrtc retries without any reset
    fresh("auto", toolkit)
    monkeypatch.setenv("FAKE_NVCC_FAILS", "1")
    for _ in range(2):
        with pytest.raises(K.KernelBuildError, match="nvcc exploded"):
            K.build()
    n = len(calls)
    monkeypatch.setenv("SMDM_KERNEL_BUILD", "nvrtc")
    assert isinstance(K.build(), NvrtcModule) and len(calls) == n


def test_nvrtc_launches_opt_in_to_their_shared_memory(monkeypatch):
    """The NVRTC module raises each kernel's dynamic shared memory limit as the nvcc launchers do. Without the
    opt-in a block gets 48 KiB in all, static shared memory included (CUDA's default limit on the dynamic part
    is 48 KiB minus the static bytes): the sampler kernels' 2720 static bytes made V or L in (11608, 12288]
    fail to launch, since the module opted in only above 48 KiB of dynamic memory. The fake kernel enforces the
    driver's rule."""
    import types

    from smdm.kernels._nvrtc import UNMASK_SCRATCH_BYTES, NvrtcModule

    class Kernel:
        def __init__(self, name):
            self.static = UNMASK_SCRATCH_BYTES if name.startswith("smdm::unmask") else 0
            self.max_dynamic_shared_size_bytes = 48 * 1024 - self.static  # the driver's default
            self.launched = 0

        def __call__(self, grid, block, args, shared_mem=0):
            assert shared_mem <= self.max_dynamic_shared_size_bytes, "too many resources requested for launch"
            assert shared_mem + self.static <= 227 * 1024
            self.launched += 1

    class Ctx:
        def __init__(self, *args):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    _fake_cupy(monkeypatch)
    mod = NvrtcModule(K.source_dir())
    kernels = {}
    mod._mod = types.SimpleNamespace(get_function=lambda name: kernels.setdefault(name, Kernel(name)))
    mod._cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(Device=Ctx, ExternalStream=Ctx))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
    for n in (100, 12000, 12288, 20000, 100):  # 12000 * 4 + 2720 > 48 KiB > 12000 * 4
        logits = torch.zeros(1, 2, n)
        cand = torch.ones(1, 2, dtype=torch.bool)
        i64 = torch.zeros(1, dtype=torch.int64)
        out = (torch.zeros(1, 2, dtype=torch.int64), torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.bool))
        mod.unmask_step(logits, None, cand, i64, 0, 0, 0.0, 1.0, 0, 1.0, 0, i64, 0.0, out[0], *out)
        mod.choose_tokens(logits[0], i64, i64, i64, 1.0, 0, 1.0, 0, i64, torch.zeros(1))
        conf = torch.zeros(1, n)
        mod.select_positions(conf, conf == 0, None, 0.5, torch.zeros(1, n, dtype=torch.bool))
    q = torch.zeros(1, 1, 1, 128, dtype=torch.bfloat16)
    mod.attention(q, q, q, None, None, torch.zeros_like(q), 0.1)  # 49408 dynamic bytes
    assert sorted(k.launched for k in kernels.values()) == [1, 10, 10]


def _need_nvcc():
    if _build.find_cuda_home() is None:
        if os.environ.get("SMDM_REQUIRE_NVCC"):  # CI installs nvcc: there a missing compiler is a failure
            pytest.fail("SMDM_REQUIRE_NVCC is set but no nvcc was found")
        pytest.skip("nvcc not installed (pip install nvidia-cuda-nvcc nvidia-cuda-cccl, or set CUDA_HOME)")


def test_compile_check_kernels_nvcc_and_nvrtc():
    _need_nvcc()
    results = K.check_sources(archs=("sm_90a",), launchers=False, nvrtc=True)
    for r in results:
        assert r.ok is not False, f"{r.name} ({r.tool}) failed:\n{r.log[-3000:]}"
    assert results[0].ok, results[0].log[-2000:]


@pytest.mark.slow
def test_compile_check_everything():
    _need_nvcc()
    results = K.check_sources()
    failed = [f"{r.name} ({r.tool}):\n{r.log[-3000:]}" for r in results if r.ok is False]
    assert not failed, "\n".join(failed)
    assert sum(r.ok is True for r in results) >= 4


_FAKE_SOURCES = {
    "smdm_common.cuh": "",
    "bindings.cpp": "#include <pybind11/pybind11.h>\nint fake_sampler();\nint fake_attention();\n"
    'PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", [] { return fake_sampler() + fake_attention(); }); }\n',
    "sampler.cu": "__global__ void k1(int* x) { *x = 1; }\nint fake_sampler() { return 40; }\n",
    "attention.cu": "__global__ void k2(int* x) { *x = 2; }\nint fake_attention() { return 2; }\n",
}


def test_concurrent_first_builds_share_one_cache_dir(tmp_path):
    """Two processes (e.g. two ranks) building at once into one cache directory: one builds, the other waits
    for it and loads the result (small stand-in sources through the real `_build_nvcc`, ~20 s)."""
    import subprocess
    import sys

    _need_nvcc()
    src = tmp_path / "src"
    src.mkdir()
    for name, text in _FAKE_SOURCES.items():
        (src / name).write_text(text)
    script = (
        "import sys\nfrom pathlib import Path\nfrom smdm.kernels import _build\n"
        "_build.device_archs = lambda: ['sm_80']\n"
        f"mod = _build._build_nvcc(Path({str(src)!r}), _build.find_cuda_home(), verbose=False)\n"
        "print('answer', mod.answer())\n"
    )
    env = dict(os.environ, SMDM_CACHE_DIR=str(tmp_path / "cache"))
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "answer 42" in out, err[-3000:]
    assert sum("(first use)" in err for _, err in outs) == 1  # built once, the other process waited


def test_build_recovers_from_a_dangling_cudart_link_and_a_stale_torch_lock(monkeypatch, tmp_path):
    """The cache directory is keyed by versions, not by the environment's path: a deleted or moved venv
    leaves `lib/libcudart.so` dangling (exists() is False, symlink_to raised FileExistsError on every build),
    and a killed build leaves torch's `lock` file, on which torch's FileBaton waits forever."""
    import torch.utils.cpp_extension as ce

    _need_nvcc()
    home = _build.find_cuda_home()
    if any((home / d / "libcudart.so").exists() for d in ("lib", "lib64")):
        pytest.skip("this toolkit has an unversioned libcudart.so: no link is made")
    monkeypatch.setenv("SMDM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_build, "device_archs", lambda: ["sm_90a"])
    seen = []

    def fake_load(*, build_directory, extra_ldflags, **kw):
        d = Path(build_directory)
        seen.append((d, (d / "lib" / "libcudart.so").resolve(), (d / "lock").exists(), extra_ldflags))
        return "module"

    monkeypatch.setattr(ce, "load", fake_load)
    assert _build._build_nvcc(K.source_dir(), home, verbose=False) == "module"
    build_dir, target, _, ldflags = seen[0]
    assert target.is_file() and target.name.startswith("libcudart.so.") and f"-L{build_dir / 'lib'}" in ldflags
    link = build_dir / "lib" / "libcudart.so"
    link.unlink()
    link.symlink_to(tmp_path / "gone" / "libcudart.so.13")  # the environment it pointed into was deleted
    (build_dir / "lock").write_text("")  # left by a killed build
    assert _build._build_nvcc(K.source_dir(), home, verbose=False) == "module"
    assert seen[1][1] == target and seen[1][2] is False


def test_jit_build_compiles_links_and_imports_without_gpu(monkeypatch, tmp_path):
    """The real first-use build (torch.utils.cpp_extension: the launchers and bindings against torch's headers,
    nvcc for sm_90a, linked) on a machine without a GPU, imported, and every binding called with CPU tensors:
    what the compile check of the kernel headers alone cannot show (~80 s on 2 cores)."""
    _need_nvcc()
    monkeypatch.setenv("SMDM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_build, "device_archs", lambda: ["sm_90a"])
    mod = _build._build_nvcc(K.source_dir(), _build.find_cuda_home(), verbose=False)
    assert {"unmask_step", "choose_tokens", "select_positions", "attention"} <= set(dir(mod))
    # every binding takes the arguments in the order and types `smdm.kernels._ops` passes them (a mismatch is
    # a pybind TypeError); CPU tensors then stop at the launcher's first device check
    q = torch.zeros(1, 1, 8, 64, dtype=torch.bfloat16)
    B, L, V = 2, 5, 16
    logits, i64 = torch.zeros(B, L, V), lambda *shape: torch.zeros(shape, dtype=torch.int64)
    f32, b8 = lambda *shape: torch.zeros(shape), lambda *shape: torch.zeros(shape, dtype=torch.bool)
    calls = {
        "attention": lambda: mod.attention(q, q, q, None, None, torch.empty_like(q), 1.0),
        "attention (segments)": lambda: mod.attention(q, q, q, i64(1, 8), i64(1, 8), torch.empty_like(q), 1.0),
        "unmask_step": lambda: mod.unmask_step(logits, None, b8(B, L), i64(B), 3, 0, 0.0, 1.0, 0, 1.0, 0,
                                               i64(B), 0.9, i64(B, L), i64(B, L), f32(B, L), b8(B, L)),
        "unmask_step (cfg, threshold)": lambda: mod.unmask_step(logits, logits, b8(B, L), i64(B), 3, 0, 1.5, 0.7,
                                                                4, 0.9, 2, None, 0.9, i64(B, L), i64(B, L),
                                                                f32(B, L), b8(B, L)),
        "choose_tokens": lambda: mod.choose_tokens(f32(4, V), i64(4), i64(4), i64(4), 1.0, 0, 1.0, 0, i64(4),
                                                   f32(4)),
        "select_positions": lambda: mod.select_positions(f32(B, L), b8(B, L), i64(B), 0.5, b8(B, L)),
        "select_positions (threshold)": lambda: mod.select_positions(f32(B, L), b8(B, L), None, 0.5, b8(B, L)),
    }
    for name, call in calls.items():
        try:
            call()
        except RuntimeError as e:
            assert "must be a CUDA tensor" in str(e), (name, str(e))
        else:
            pytest.fail(f"{name}: CPU tensors raised nothing")


@pytest.mark.slow
def test_attention_kernel_uses_tensor_cores():
    _need_nvcc()
    if not (_build.find_cuda_home() / "bin" / "cuobjdump").is_file():
        pytest.skip("cuobjdump not installed (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    counts = _build.disassemble_mma("sm_90a")
    attn = {k: c for k, c in counts.items() if "flash_attn" in k}
    assert attn and all(c["HMMA"] >= 64 and c["LDSM"] > 0 for c in attn.values())


def test_cli_registers_check_build_sass(capsys):
    from smdm.cli import main

    with pytest.raises(SystemExit):
        main(["kernels", "--help"])
    out = capsys.readouterr().out
    assert "check" in out and "build" in out and "sass" in out


# ------------------------------------------------------------------------------------------------------------
# the kernel code itself on CPU: a host emulation of csrc/ (smdm.kernels._emulate: threads, barriers, warp
# exchanges, and ldmatrix / mma / cp.async after the PTX ISA tables). No races or device-compiler effects.
# ------------------------------------------------------------------------------------------------------------
def _emulator():
    from smdm.kernels import _emulate as E

    try:
        E.load()
    except E.EmulatorUnavailable as e:
        pytest.skip(str(e))
    return E


def _emulated_step_equals_reference(E, dtype, V, conf, opts, seed, threads=64, B=2, L=9):
    g = torch.Generator().manual_seed(seed)
    logits = _edge_logits(B, L, V, dtype, g)
    cand = torch.rand(B, L, generator=g) < 0.8
    cand[0, :8] = True
    kw = dict(
        temperature=opts["temperature"],
        top_k=opts.get("top_k", 0),
        top_p=opts.get("top_p", 1.0),
        confidence=conf,
        position_offset=4,
    )
    if opts.get("cfg"):
        kw.update(uncond_logits=(torch.randn(B, L, V, generator=g) * 3).to(dtype), cfg_scale=opts["cfg"])
    if "threshold" in opts:
        kw["threshold"] = opts["threshold"]
    else:
        kw["n_commit"] = torch.tensor([7, 3, 1][:B])
    seeds = torch.tensor([3, -(2**61), 5][:B])
    buf = torch.randint(0, V, (B, L + 9), generator=g)
    buf_r = buf.clone()
    got = E.unmask_step(logits, buf[:, 4 : 4 + L], cand, seeds, 5, threads=threads, **kw)
    want = R.unmask_step_reference(logits, buf_r[:, 4 : 4 + L], cand, seeds, 5, **kw)
    for name, a, b in zip(("pred", "conf", "committed"), got, want):
        assert _same(a, b), (dtype, V, conf, opts, name, (a != b).nonzero()[:8].tolist())
    assert torch.equal(buf, buf_r)


EMU_SAMPLER_CASES = [
    # dtype, V (odd: scalar loads; multiple of 8: 16-byte loads), confidence, options
    (torch.float32, 1001, "prob", dict(temperature=0.0)),
    (torch.bfloat16, 1000, "margin", dict(temperature=1.0, top_k=7)),
    (torch.float16, 1000, "neg_entropy", dict(temperature=0.8, top_p=0.9, threshold=0.05)),
    (torch.bfloat16, 1001, "prob", dict(temperature=1.2, top_k=40, top_p=0.5, cfg=1.5)),
    (torch.float32, 1000, "neg_entropy", dict(temperature=0.7, top_k=500, top_p=0.999)),
]


@pytest.mark.parametrize("case", EMU_SAMPLER_CASES)
def test_emulated_sampler_kernels_equal_reference(case):
    E = _emulator()
    dtype, V, conf, opts = case
    _emulated_step_equals_reference(E, dtype, V, conf, opts, seed=V + len(opts))


@pytest.mark.slow
def test_emulated_sampler_kernels_full_grid():
    E = _emulator()
    opts = [
        dict(temperature=0.0),
        dict(temperature=1.0, top_k=7),
        dict(temperature=0.8, top_p=0.9, threshold=0.05),
        dict(temperature=1.2, top_k=40, top_p=0.5),
        dict(temperature=0.7, top_k=2000, top_p=0.999, cfg=1.5),
    ]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for conf in ("prob", "margin", "neg_entropy"):
            for i, o in enumerate(opts):
                _emulated_step_equals_reference(E, dtype, 3001 - (i % 2), conf, o, seed=i, threads=96)
    # the real launch shape: 1024 threads, a 32000 / 32003 vocabulary
    _emulated_step_equals_reference(
        E, torch.bfloat16, 32000, "prob", dict(temperature=1.0, top_k=50, top_p=0.9), 7, 1024, B=1
    )
    _emulated_step_equals_reference(
        E, torch.float32, 32003, "neg_entropy", dict(temperature=0.0, top_p=0.5, threshold=0.0), 8, 1024, B=1
    )


def test_emulated_kernels_make_no_misaligned_16_byte_access():
    """Contiguous logits that start off a 16-byte boundary (a slice of a flat buffer; cond and uncond
    misaligned differently) with V % 8 == 0: the sampler must fall back from its 16-byte loads, which fault on
    a GPU at such addresses. The emulator counts every 16-byte access (global loads, cp.async, ldmatrix) off
    alignment; an attention call on a q 2 bytes off shows that it does."""
    E = _emulator()
    g = torch.Generator().manual_seed(31)
    B, L, V = 2, 3, 1000
    for dtype, off in ((torch.bfloat16, 1), (torch.bfloat16, 4), (torch.float16, 8), (torch.float32, 2)):
        shifted = (torch.randn(B * L * V + off, generator=g) * 3).to(dtype)[off:].view(B, L, V)
        aligned = (torch.randn(B, L, V, generator=g) * 3).to(dtype)
        for cond, uncond in ((shifted, None), (shifted, aligned), (aligned, shifted)):
            kw = dict(temperature=1.0, top_k=9, n_commit=torch.tensor([1, 2]))
            if uncond is not None:
                kw.update(uncond_logits=uncond, cfg_scale=0.5)
            cand = torch.ones(B, L, dtype=torch.bool)
            seeds = torch.tensor([4, 5])
            tok_e, tok_r = torch.zeros(B, L, dtype=torch.int64), torch.zeros(B, L, dtype=torch.int64)
            got = E.unmask_step(cond, tok_e, cand, seeds, 2, **kw)
            want = R.unmask_step_reference(cond, tok_r, cand, seeds, 2, **kw)
            assert all(_same(a, b) for a, b in zip(got, want)) and torch.equal(tok_e, tok_r), (dtype, off)
    q = torch.randn(64 * 64 + 1, generator=g).to(torch.bfloat16)[1:].view(1, 1, 64, 64)
    with pytest.raises(E.MisalignedAccess, match="attention"):
        E.attention(q, q, q)
    E.attention(q.clone(), q.clone(), q.clone())  # the count starts afresh


def test_reference_entropy_of_nan_and_inf_rows_is_the_kernels():
    """Rows with +inf or NaN logits: the entropy terms are NaN (inf - inf, 0 * -inf); the device's
    saturating conversion makes them 0, so the confidence is NaN (ranked first). The reference used a torch
    NaN -> int64 cast (undefined: INT64_MIN on x86) and returned +inf."""
    E = _emulator()
    V = 33
    x = torch.randn(1, 5, V, generator=torch.Generator().manual_seed(3))
    x[0, 0, 4] = math.inf
    x[0, 1, 7] = math.nan
    x[0, 2, 4] = x[0, 2, 9] = math.inf
    x[0, 3, 0], x[0, 3, 1] = math.inf, -math.inf
    cand = torch.ones(1, 5, dtype=torch.bool)
    seeds = torch.tensor([1])
    for T in (0.0, 1.0):
        kw = dict(temperature=T, confidence="neg_entropy", n_commit=torch.tensor([2]))
        want = R.unmask_step_reference(x, torch.zeros(1, 5, dtype=torch.int64), cand, seeds, 0, **kw)
        assert want[1][0, :4].isnan().all(), want[1]
        got = E.unmask_step(x, torch.zeros(1, 5, dtype=torch.int64), cand, seeds, 0, **kw)
        for a, b in zip(got, want):
            assert _same(a, b), (a, b)
    assert R.fixed31(torch.tensor([math.nan, -0.5, 0.0, 1.0])).tolist() == [0, 0, 0, 2**31]


def test_emulated_select_positions_equal_reference():
    E = _emulator()
    g = torch.Generator().manual_seed(24)
    conf = torch.rand(5, 301, generator=g)
    pick = torch.rand(5, 301, generator=g)
    conf[pick < 0.1] = -math.inf
    conf[(pick >= 0.1) & (pick < 0.12)] = math.nan
    conf[(pick >= 0.12) & (pick < 0.2)] = 0.0
    conf[(pick >= 0.2) & (pick < 0.3)] = -0.0
    conf[(pick >= 0.3) & (pick < 0.4)] = 0.5
    conf[3] = -math.inf
    cand = torch.rand(5, 301, generator=g) < 0.7
    n = torch.tensor([0, 5, 100, 301, -1])
    for kw in (dict(n=n), dict(threshold=0.5), dict(threshold=2.0)):
        want = R.select_positions_reference(conf, cand, **kw)
        assert torch.equal(E.select_positions(conf, cand, **kw), want), kw
        assert torch.equal(E.select_positions(conf, cand, threads=128, **kw), want), kw


EMU_ATTN_CASES = [
    # dtype, B, Hq, Hkv, Lq, Lk, D, documents
    (torch.bfloat16, 1, 2, 1, 70, 130, 64, 0),  # tails of both tiles, GQA, Lk > Lq
    (torch.float16, 2, 2, 2, 100, 100, 128, 3),  # documents, rows without keys
    (torch.bfloat16, 1, 1, 1, 33, 200, 128, 2),  # a block of queries over a prefix, documents
]


@pytest.mark.parametrize("case", EMU_ATTN_CASES)
def test_emulated_attention_kernel_matches_reference(case):
    E = _emulator()
    dtype, B, Hq, Hkv, Lq, Lk, D, ndocs = case
    g = torch.Generator().manual_seed(Lq + Lk + D)
    q = torch.randn(B, Hq, Lq, D, generator=g).to(dtype)
    k = (torch.randn(B, Hkv, Lk, D, generator=g) * 2).to(dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    ks = _segments(B, Lk, ndocs, g)
    qs = None
    if ks is not None:
        qs = ks[:, Lk - Lq :].clone()
        qs[0, Lq // 3 : Lq // 3 + 5] = 99  # no key has segment 99
    out = E.attention(q, k, v, q_segment_ids=qs, k_segment_ids=ks)
    ref = R.attention_reference(q, k, v, q_segment_ids=qs, k_segment_ids=ks, out_dtype=torch.float32)
    pt = _low_precision_attention(q, k, v, qs, ks, D**-0.5)
    err, err_pt = (out.float() - ref).abs().max().item(), (pt.float() - ref).abs().max().item()
    assert not out.isnan().any() and err <= 2 * err_pt + 1e-5, (err, err_pt)
    if qs is not None:
        assert (out[0, :, Lq // 3 : Lq // 3 + 5] == 0).all()


# ------------------------------------------------------------------------------------------------------------
# GPU: the kernels against the references
# ------------------------------------------------------------------------------------------------------------
def _cuda():
    if not CUDA:
        pytest.skip("needs a CUDA device")
    try:
        return K.build()
    except K.KernelBuildError as e:
        pytest.fail(f"kernel build failed: {e}")


SAMPLER_CASES = [
    # dtype, B, L, V, cfg, T, top_k, top_p, confidence, mode
    (torch.float32, 2, 9, 32000, 0.0, 0.0, 0, 1.0, "prob", "count"),
    (torch.bfloat16, 3, 17, 32000, 0.0, 1.0, 0, 1.0, "prob", "count"),
    (torch.bfloat16, 2, 33, 32000, 1.5, 0.8, 50, 0.9, "margin", "threshold"),
    (torch.float16, 4, 5, 1000, 0.5, 1.3, 0, 0.5, "neg_entropy", "count"),
    (torch.float32, 1, 64, 257, 0.0, 2.0, 1, 1.0, "margin", "threshold"),
    (torch.bfloat16, 5, 12, 32000, 2.0, 1.0, 3, 0.95, "prob", "count"),
]


@gpu
@pytest.mark.parametrize("index", range(len(SAMPLER_CASES)))
def test_gpu_unmask_step_identical_to_reference(index):
    _cuda()
    dtype, B, L, V, cfg, T, top_k, top_p, conf, mode = SAMPLER_CASES[index]
    g = torch.Generator(device="cuda").manual_seed(100 + index)
    logits = (torch.randn(B, L, V, device="cuda", generator=g) * 4).to(dtype)
    logits[0, 0, :7] = logits[0, 0, 7]  # ties
    uncond = (torch.randn(B, L, V, device="cuda", generator=g) * 4).to(dtype) if cfg else None
    cand = torch.rand(B, L, device="cuda", generator=g) < 0.7
    seeds = torch.randint(-(2**62), 2**62, (B,), device="cuda", generator=g)
    kw = dict(
        uncond_logits=uncond,
        cfg_scale=cfg,
        temperature=T,
        top_k=top_k,
        top_p=top_p,
        confidence=conf,
        position_offset=3,
    )
    if mode == "count":
        kw["n_commit"] = torch.randint(0, L, (B,), device="cuda", generator=g)
    else:
        kw["threshold"] = 0.3
    tok_k = torch.randint(0, V, (B, L), device="cuda", generator=g)
    tok_r = tok_k.clone()
    got = K.unmask_step(logits, tok_k, cand, seeds, 11, backend="cuda", **kw)
    want = R.unmask_step_reference(logits, tok_r, cand, seeds, 11, **kw)
    names = ("pred", "conf", "committed")
    for name, a, b in zip(names, got, want):
        assert torch.equal(a, b), f"{name}: {(a != b).sum().item()} of {a.numel()} differ"
    assert torch.equal(tok_k, tok_r)
    # the CPU reference agrees too (every decision is exact IEEE / integer arithmetic)
    cpu = R.unmask_step_reference(
        logits.cpu(),
        tok_r.cpu(),
        cand.cpu(),
        seeds.cpu(),
        11,
        **{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()},
    )
    assert torch.equal(cpu[0], got[0].cpu()) and torch.equal(cpu[1], got[1].cpu())


@gpu
def test_gpu_outputs_fully_written_over_poison():
    mod = _cuda()
    B, L, V = 3, 20, 5000
    logits = torch.randn(B, L, V, device="cuda")
    cand = torch.rand(B, L, device="cuda") < 0.5
    seeds = torch.arange(B, device="cuda")
    tokens = torch.full((B, L), 7, dtype=torch.int64, device="cuda")
    pred = torch.full((B, L), -12345, dtype=torch.int64, device="cuda")
    conf = torch.full((B, L), float("nan"), device="cuda")
    committed = torch.ones(B, L, dtype=torch.uint8, device="cuda").bool()
    committed.view(torch.uint8).fill_(0xAB)  # neither 0 nor 1
    mod.unmask_step(
        logits,
        None,
        cand,
        seeds,
        1,
        0,
        0.0,
        1.0,
        0,
        1.0,
        0,
        torch.full((B,), 4, device="cuda"),
        0.0,
        tokens,
        pred,
        conf,
        committed,
    )
    torch.cuda.synchronize()
    assert not (pred == -12345).any() and not conf.isnan().any()
    assert set(committed.view(torch.uint8).unique().tolist()) <= {0, 1}
    assert torch.equal(pred == -1, ~cand) and (conf[~cand] == -math.inf).all()
    q = torch.randn(2, 4, 100, 64, device="cuda", dtype=torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    mod.attention(q, q, q, None, None, out, 0.125)
    torch.cuda.synchronize()
    assert not out.isnan().any()


@gpu
def test_gpu_sampler_statistics():
    _cuda()
    V, N = 16, 40000
    base = torch.linspace(-2, 2, V, device="cuda")
    base[3] = -math.inf  # zero probability: never drawn
    logits = base.expand(N, V).contiguous()
    seeds = torch.arange(N, device="cuda")
    T = 0.7
    tok, _ = K.choose_tokens(logits, seeds=seeds, positions=5, step=0, temperature=T, backend="cuda")
    freq = torch.bincount(tok, minlength=V).double() / N
    p = torch.softmax(base.double() / T, 0)
    assert freq[3] == 0
    # 5-sigma binomial band per token
    assert ((freq - p).abs() <= 5 * torch.sqrt(p * (1 - p) / N) + 1e-4).all(), (freq, p)
    tok_k, _ = K.choose_tokens(
        logits, seeds=seeds, positions=5, step=0, temperature=T, top_k=4, backend="cuda"
    )
    assert set(tok_k.unique().tolist()) <= {12, 13, 14, 15}


@gpu
def test_gpu_unmask_step_takes_a_strided_n_commit():
    """n_commit is only validated for shape/dtype/device in Python; a column of a (B, k) table used to reach
    the launcher's contiguity check and raise even with backend="auto"."""
    _cuda()
    g = torch.Generator(device="cuda").manual_seed(4)
    logits = torch.randn(3, 6, 50, device="cuda", generator=g)
    cand = torch.ones(3, 6, dtype=torch.bool, device="cuda")
    seeds = torch.tensor([1, 2, 3], device="cuda")
    table = torch.tensor([[1, 9], [2, 9], [4, 9]], device="cuda")
    tok_k = torch.zeros(3, 6, dtype=torch.int64, device="cuda")
    tok_r = tok_k.clone()
    got = K.unmask_step(logits, tok_k, cand, seeds, 0, temperature=0.5, n_commit=table[:, 0], backend="cuda")
    want = R.unmask_step_reference(logits, tok_r, cand, seeds, 0, temperature=0.5, n_commit=table[:, 0])
    assert all(_same(a, b) for a, b in zip(got, want)) and torch.equal(tok_k, tok_r)
    assert got[2].sum(1).tolist() == [1, 2, 4]


@gpu
def test_gpu_batch_invariance():
    _cuda()
    V, L = 32000, 24
    g = torch.Generator(device="cuda").manual_seed(9)
    row = torch.randn(1, L, V, device="cuda", generator=g).to(torch.bfloat16)
    others = torch.randn(6, L, V, device="cuda", generator=g).to(torch.bfloat16)
    big = torch.cat([others[:4], row, others[4:]])
    cand = torch.ones(7, L, dtype=torch.bool, device="cuda")
    seeds = torch.tensor([1, 2, 3, 4, 42, 5, 6], device="cuda")
    kw = dict(temperature=1.0, top_p=0.9, n_commit=torch.full((7,), 5, device="cuda"))
    a = K.unmask_step(
        big, torch.zeros(7, L, dtype=torch.int64, device="cuda"), cand, seeds, 2, backend="cuda", **kw
    )
    kw["n_commit"] = kw["n_commit"][:1]
    b = K.unmask_step(
        row,
        torch.zeros(1, L, dtype=torch.int64, device="cuda"),
        cand[:1],
        seeds[4:5],
        2,
        backend="cuda",
        **kw,
    )
    for x, y in zip(a, b):
        assert torch.equal(x[4:5], y)


@gpu
def test_gpu_choose_tokens_and_select_positions_match_references():
    _cuda()
    g = torch.Generator(device="cuda").manual_seed(10)
    logits = torch.randn(300, 32000, device="cuda", generator=g)
    seeds = torch.randint(0, 2**40, (300,), device="cuda", generator=g)
    pos = torch.randint(0, 2048, (300,), device="cuda", generator=g)
    for opts in (
        {"temperature": 0.0},
        {"temperature": 1.0, "top_k": 100},
        {"temperature": 0.5, "top_p": 0.8, "confidence": "entropy"},
    ):
        a = K.choose_tokens(logits, seeds=seeds, positions=pos, step=7, backend="cuda", **opts)
        b = R.choose_tokens_reference(logits, seeds=seeds, positions=pos, step=7, **opts)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), opts
    conf = torch.rand(8, 1000, device="cuda", generator=g)
    conf[:, 10:20] = 0.5  # ties
    cand = torch.rand(8, 1000, device="cuda", generator=g) < 0.8
    n = torch.randint(0, 900, (8,), device="cuda", generator=g)
    assert torch.equal(
        K.select_positions(conf, cand, n=n, backend="cuda"), R.select_positions_reference(conf, cand, n)
    )
    assert torch.equal(
        K.select_positions(conf, cand, threshold=0.9, backend="cuda"),
        R.select_positions_reference(conf, cand, threshold=0.9),
    )


def _same(a, b):
    """Equal tensors, NaN == NaN (a NaN confidence is a decided value: rows of -inf / NaN logits)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _edge_logits(B, L, V, dtype, g):
    """Logits rows that exercise the special cases of the sampler (rows 0-7 of sequence 0)."""
    x = torch.randn(B, L, V, device=g.device, generator=g) * 3
    x[0, 0] = -math.inf  # nothing finite: token 0, confidence NaN
    x[0, 1, 5] = math.nan  # a NaN: torch.argmax picks it
    x[0, 2, 100] = math.inf
    x[0, 3] = 0.0
    x[0, 3, ::2] = -0.0  # +0 / -0 everywhere: one big tie (top-k cuts inside it)
    x[0, 4, :50] = x[0, 4].max() + 1  # 50 tied maxima
    x[0, 5, V // 3 :] = -math.inf  # few finite entries (top-k larger than them)
    x[0, 6, V - 1] = x[0, 6].max() + 6  # the winner in the tail of the row
    x[0, 7] = x[0, 7] * 1e-3 - 1e4  # far from 0, tiny spread
    return x.to(dtype)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("conf", ["prob", "margin", "neg_entropy"])
def test_gpu_unmask_step_edge_rows_and_tails(dtype, conf):
    """V = 32003 (scalar loads, a tail in every loop), L = 70, special rows, a strided token buffer."""
    _cuda()
    B, L, V = 2, 70, 32003
    g = torch.Generator(device="cuda").manual_seed(21)
    logits = _edge_logits(B, L, V, dtype, g)
    uncond = (torch.randn(B, L, V, device="cuda", generator=g) * 3).to(dtype)
    cand = torch.rand(B, L, device="cuda", generator=g) < 0.8
    cand[0, :8] = True
    seeds = torch.tensor([3, -(2**61)], device="cuda")
    for opts in (
        dict(temperature=0.0),
        dict(temperature=1.0, top_k=7),
        dict(temperature=0.8, top_p=0.9, threshold=0.05),
        dict(temperature=1.2, top_k=40, top_p=0.5),
        dict(temperature=0.7, top_k=20000, top_p=0.999, uncond=True),
    ):
        kw = dict(
            temperature=opts["temperature"],
            top_k=opts.get("top_k", 0),
            top_p=opts.get("top_p", 1.0),
            confidence=conf,
            position_offset=4,
        )
        if opts.get("uncond"):
            kw.update(uncond_logits=uncond, cfg_scale=1.5)
        if "threshold" in opts:
            kw["threshold"] = opts["threshold"]
        else:
            kw["n_commit"] = torch.tensor([9, 30], device="cuda")
        buf = torch.randint(0, V, (B, L + 9), device="cuda", generator=g)
        buf_r = buf.clone()
        got = K.unmask_step(logits, buf[:, 4 : 4 + L], cand, seeds, 5, backend="cuda", **kw)
        want = R.unmask_step_reference(logits, buf_r[:, 4 : 4 + L], cand, seeds, 5, **kw)
        for name, a, b in zip(("pred", "conf", "committed"), got, want):
            assert _same(a, b), (opts, name, (a != b).nonzero()[:8].tolist())
        assert torch.equal(buf, buf_r), opts
        assert ((got[0] >= 0) & (got[0] < V))[cand].all()


@gpu
def test_gpu_select_positions_special_values():
    _cuda()
    sampling = pytest.importorskip("smdm.sampling")
    inf, nan = math.inf, math.nan
    g = torch.Generator(device="cuda").manual_seed(22)
    conf = torch.rand(6, 3001, device="cuda", generator=g)
    pick = torch.rand(6, 3001, device="cuda", generator=g)
    conf[pick < 0.1] = -inf
    conf[(pick >= 0.1) & (pick < 0.12)] = nan
    conf[(pick >= 0.12) & (pick < 0.2)] = 0.0
    conf[(pick >= 0.2) & (pick < 0.3)] = -0.0
    conf[(pick >= 0.3) & (pick < 0.4)] = 0.5
    conf[3] = -inf  # a row of -inf only
    cand = torch.rand(6, 3001, device="cuda", generator=g) < 0.7
    n = torch.tensor([0, 5, 400, 2000, 3001, -1], device="cuda")
    for kw in (dict(n=n), dict(threshold=0.5), dict(threshold=2.0)):
        a = K.select_positions(conf, cand, backend="cuda", **kw)
        b = R.select_positions_reference(conf, cand, **kw)
        cpu_kw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        c = sampling.select_positions(conf.cpu(), cand.cpu(), **cpu_kw)
        assert torch.equal(a, b) and torch.equal(a.cpu(), c), kw


@gpu
def test_gpu_offsets_beyond_int32():
    """Element offsets above 2^31: B * L * V logits (4.6 GB bf16) and B * H * L * D attention (4.4 GB)."""
    _cuda()
    if torch.cuda.mem_get_info()[0] < 16e9:
        pytest.skip("needs 16 GB of free GPU memory")
    B, L, V = 35, 2048, 32000
    logits = torch.empty(B, L, V, device="cuda", dtype=torch.bfloat16).normal_(0, 3)
    cand = torch.zeros(B, L, dtype=torch.bool, device="cuda")
    cand[0, :3] = cand[-1, -5:] = cand[B // 2, 7] = True
    seeds = torch.arange(B, device="cuda")
    kw = dict(temperature=1.0, top_k=50, top_p=0.9, n_commit=torch.full((B,), 2, device="cuda"))
    tok_k = torch.zeros(B, L, dtype=torch.int64, device="cuda")
    tok_r = tok_k.clone()
    got = K.unmask_step(logits, tok_k, cand, seeds, 1, backend="cuda", **kw)
    want = R.unmask_step_reference(logits, tok_r, cand, seeds, 1, **kw)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    del logits, got, want
    torch.cuda.empty_cache()
    q = torch.empty(2100, 64, 128, 128, device="cuda", dtype=torch.bfloat16).normal_()
    kv = torch.randn(2100, 1, 128, 128, device="cuda", dtype=torch.bfloat16)
    out = K.attention(q, kv, kv, backend="cuda")
    ref = R.attention_reference(q[-1:], kv[-1:], kv[-1:])
    assert (out[-1:].float() - ref.float()).abs().max().item() < 2e-2


@gpu
def test_gpu_attention_documents_tails_and_empty_rows_over_poison():
    mod = _cuda()
    g = torch.Generator().manual_seed(23)
    for dtype, D, Lq, Lk in ((torch.float16, 64, 1000, 1000), (torch.bfloat16, 128, 100, 1000)):
        B, Hq, Hkv = 2, 4, 2
        q = torch.randn(B, Hq, Lq, D, generator=g).to("cuda", dtype)
        k = torch.randn(B, Hkv, Lk, D, generator=g).to("cuda", dtype) * 4
        v = torch.randn(B, Hkv, Lk, D, generator=g).to("cuda", dtype)
        ks = _segments(B, Lk, 7, g)
        qs = ks[:, Lk - Lq :].clone()
        qs[0, Lq // 2 : Lq // 2 + 21] = 99  # no key has segment 99: rows inside a tile see nothing
        qs, ks = qs.cuda().contiguous(), ks.cuda()
        out = torch.full((B, Hq, Lq, D), math.nan, device="cuda", dtype=dtype)
        mod.attention(q, k, v, qs, ks, out, D**-0.5)
        torch.cuda.synchronize()
        ref = R.attention_reference(q, k, v, q_segment_ids=qs, k_segment_ids=ks, out_dtype=torch.float32)
        assert not out.isnan().any()
        assert (out[0, :, Lq // 2 : Lq // 2 + 21] == 0).all()
        pt = _low_precision_attention(q, k, v, qs, ks, D**-0.5)
        err, err_pt = (out.float() - ref).abs().max().item(), (pt.float() - ref).abs().max().item()
        assert err <= 2 * err_pt + 1e-5, (dtype, D, err, err_pt)


ATTN_CASES = [
    # dtype, B, Hq, Hkv, Lq, Lk, D, documents
    (torch.bfloat16, 2, 4, 4, 128, 128, 64, 0),
    (torch.bfloat16, 1, 8, 2, 1000, 1000, 128, 0),
    (torch.float16, 2, 6, 3, 257, 257, 64, 3),
    (torch.bfloat16, 3, 4, 4, 512, 512, 128, 5),
    (torch.bfloat16, 2, 4, 2, 64, 700, 128, 0),  # a block of queries over cached prefix K/V
    (torch.float16, 1, 2, 2, 33, 97, 64, 2),
    (torch.bfloat16, 2, 14, 14, 2048, 2048, 128, 4),
]


def _segments(B, L, ndocs, g):
    if ndocs == 0:
        return None
    cuts = [sorted(torch.randint(1, L, (ndocs - 1,), generator=g).tolist()) for _ in range(B)]
    seg = torch.zeros(B, L, dtype=torch.int32)
    for b, cs in enumerate(cuts):
        for c in cs:
            seg[b, c:] += 1
    return seg


def _low_precision_attention(q, k, v, qs, ks, scale):
    """Plain PyTorch at the inputs' precision (the baseline error of the 2x rule)."""
    from smdm.kernels._reference import attention_plain

    return attention_plain(q, k, v, q_segment_ids=qs, k_segment_ids=ks, scale=scale)


@gpu
@pytest.mark.parametrize("case", ATTN_CASES)
def test_gpu_attention_error_within_2x_of_pytorch(case):
    _cuda()
    dtype, B, Hq, Hkv, Lq, Lk, D, ndocs = case
    g = torch.Generator().manual_seed(Lq * 7 + D)
    q = torch.randn(B, Hq, Lq, D, generator=g).to("cuda", dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to("cuda", dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=g).to("cuda", dtype)
    ks = _segments(B, Lk, ndocs, g)
    qs = None if ks is None else ks[:, Lk - Lq :].contiguous()
    if ks is not None:
        qs, ks = qs.cuda(), ks.cuda()
    scale = D**-0.5
    out = K.attention(q, k, v, q_segment_ids=qs, k_segment_ids=ks, backend="cuda")
    ref = R.attention_reference(q, k, v, q_segment_ids=qs, k_segment_ids=ks, out_dtype=torch.float32)
    pt = _low_precision_attention(q, k, v, qs, ks, scale)
    err, err_pt = (out.float() - ref).abs().max().item(), (pt.float() - ref).abs().max().item()
    assert err <= 2 * err_pt + 1e-5, (err, err_pt)
    # transposed (B, L, H, D) views are accepted without copies
    out_t = K.attention(
        q.transpose(1, 2).contiguous().transpose(1, 2),
        k,
        v,
        q_segment_ids=qs,
        k_segment_ids=ks,
        backend="cuda",
    )
    assert torch.equal(out_t, out)


@gpu
def test_gpu_layouts_the_emulator_cannot_fault_on():
    """Addresses and sizes where only a GPU fails: logits that start off 16-byte alignment (cond, uncond) with
    V % 8 == 0 (16-byte loads would fault; the kernel must take its scalar loads), V and L just above the
    48 KiB default shared memory limit once the 2720 static bytes are added (12000 * 4 + 2720 > 49152), and
    attention over K/V slices of a longer cache buffer with a (B, L, H, D) query view: the same bits as
    contiguous copies."""
    _cuda()
    g = torch.Generator(device="cuda").manual_seed(17)
    B, L, V = 2, 5, 32000
    flat = torch.randn(B * L * V + 8, device="cuda", generator=g).to(torch.bfloat16) * 3
    shifted = flat[1 : 1 + B * L * V].view(B, L, V)  # 2 bytes past a 16-byte boundary
    aligned = flat[8:].view(B, L, V)
    cand = torch.ones(B, L, dtype=torch.bool, device="cuda")
    seeds, n = torch.tensor([1, 2], device="cuda"), torch.tensor([2, 3], device="cuda")
    for cond, uncond in ((shifted, None), (shifted, aligned), (aligned, shifted)):
        kw = dict(temperature=1.0, top_k=40, n_commit=n, uncond_logits=uncond, cfg_scale=0.5)
        t_k = torch.zeros(B, L, dtype=torch.int64, device="cuda")
        t_r = t_k.clone()
        got = K.unmask_step(cond, t_k, cand, seeds, 3, backend="cuda", **kw)
        want = R.unmask_step_reference(cond, t_r, cand, seeds, 3, **kw)
        assert all(_same(a, b) for a, b in zip(got, want)) and torch.equal(t_k, t_r)
    for n_ in (12000, 12288):
        rows = torch.randn(3, n_, device="cuda", generator=g)
        kw = dict(seeds=torch.arange(3, device="cuda"), positions=7, step=1, temperature=1.0, top_p=0.9)
        got = K.choose_tokens(rows, backend="cuda", **kw)
        assert all(_same(a, b) for a, b in zip(got, R.choose_tokens_reference(rows, **kw)))
        conf, cand_ = rows.clone(), rows > 0
        got = K.select_positions(conf, cand_, n=torch.tensor([5, 0, n_], device="cuda"), backend="cuda")
        assert torch.equal(got, R.select_positions_reference(conf, cand_, torch.tensor([5, 0, n_], device="cuda")))
    Bq, H, Hkv, Lq, Lk, D, max_len = 2, 8, 2, 70, 200, 128, 333
    cache = torch.randn(2, Bq, Hkv, max_len, D, device="cuda", generator=g).to(torch.bfloat16)
    k, v = cache[0, :, :, :Lk], cache[1, :, :, :Lk]  # what the model passes with a KV cache
    q = torch.randn(Bq, Lq, H, D, device="cuda", generator=g).to(torch.bfloat16).transpose(1, 2)
    seg = torch.randint(0, 3, (Bq, Lk), device="cuda", generator=g).sort(1).values.int()
    for qs, ks in ((None, None), (seg[:, -Lq:].contiguous(), seg)):
        out = K.attention(q, k, v, q_segment_ids=qs, k_segment_ids=ks, backend="cuda")
        ref = K.attention(q.contiguous(), k.contiguous(), v.contiguous(), q_segment_ids=qs, k_segment_ids=ks,
                          backend="cuda")
        assert torch.equal(out, ref)


@gpu
def test_gpu_attention_rows_without_keys_are_zero():
    _cuda()
    q = torch.randn(1, 2, 70, 64, device="cuda", dtype=torch.bfloat16)
    qs = torch.zeros(1, 70, dtype=torch.int32, device="cuda")
    qs[0, 60:] = 9  # no key has segment 9
    ks = torch.zeros(1, 70, dtype=torch.int32, device="cuda")
    out = K.attention(q, q, q, q_segment_ids=qs, k_segment_ids=ks, backend="cuda")
    assert (out[0, :, 60:] == 0).all() and out[0, :, :60].abs().sum() > 0


@gpu
def test_gpu_attention_with_grad_takes_the_reference_or_refuses():
    """The kernel has no backward: with q/k/v requiring grad, "auto" takes the differentiable reference (it
    used to run the kernel, and backward() failed with "no autograd formula"), backend="cuda" refuses."""
    _cuda()
    q = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = K.attention(q, q, q, backend="auto")
    out.float().sum().backward()
    ref = q.detach().clone().requires_grad_()
    K.attention_reference(ref, ref, ref, scale=1 / 8).float().sum().backward()
    assert torch.equal(q.grad, ref.grad)
    with pytest.raises(ValueError, match="forward only"):
        K.attention(q, q, q, backend="cuda")
    with torch.no_grad():
        K.attention(q, q, q, backend="cuda")  # no grad wanted: the kernel


@gpu
def test_gpu_auto_backend_and_compile():
    _cuda()
    q = torch.randn(1, 4, 256, 128, device="cuda", dtype=torch.bfloat16)
    a = K.attention(q, q, q)  # auto -> kernel
    b = K.attention(q, q, q, backend="cuda")
    assert torch.equal(a, b)
    f = torch.compile(lambda q: K.attention(q, q, q, backend="cuda") * 2, fullgraph=True)
    assert torch.equal(f(q), b * 2)
    g = torch.compile(lambda q: torch.ops.smdm.attention(q, q, q, None, None, 128**-0.5), fullgraph=True)
    assert torch.equal(g(q), b)
    os.environ["SMDM_KERNELS"] = "reference"
    try:
        c = K.attention(q, q, q)
    finally:
        del os.environ["SMDM_KERNELS"]
    assert torch.allclose(c.float(), b.float(), atol=2e-2)


@gpu
def test_gpu_compiled_calls_choose_like_eager(monkeypatch):
    """torch.compile(fullgraph=True) over the public functions on CUDA: the same results as eager, a q/k/v
    start address off 16-byte alignment (invisible while tracing) falls back under "auto" and raises under
    "cuda" when the op runs, and a failed build falls back (auto) or raises (cuda) at the first call."""
    _cuda()
    g = torch.Generator(device="cuda").manual_seed(3)
    logits = torch.randn(2, 5, 1000, device="cuda", generator=g).to(torch.bfloat16)
    cand = torch.ones(2, 5, dtype=torch.bool, device="cuda")
    seeds, n = torch.tensor([4, 5], device="cuda"), torch.tensor([2, 3], device="cuda")

    def step(logits, tokens):
        return K.unmask_step(logits, tokens, cand, seeds, 1, temperature=1.0, n_commit=n)

    t_c, t_e = torch.zeros(2, 5, dtype=torch.int64, device="cuda"), torch.zeros(2, 5, dtype=torch.int64, device="cuda")
    got, want = torch.compile(step, backend="aot_eager", fullgraph=True)(logits, t_c), step(logits, t_e)
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and torch.equal(t_c, t_e)

    buf = torch.randn(2 * 128 * 64 + 1, device="cuda", dtype=torch.bfloat16)
    q = buf[1:].view(1, 2, 128, 64)  # strides fine, start 2 bytes off alignment
    eager = K.attention(q, q, q)  # auto: the reference
    assert torch.equal(eager, K.attention_reference(q, q, q))
    auto = torch.compile(lambda q: K.attention(q, q, q), backend="eager", fullgraph=True)
    assert torch.equal(auto(q), eager)
    explicit = torch.compile(lambda q: K.attention(q, q, q, backend="cuda"), backend="eager", fullgraph=True)
    with pytest.raises(ValueError, match="16-byte aligned"):
        explicit(q)

    qa = torch.randn(1, 2, 128, 64, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setattr(_build, "_module", None)
    monkeypatch.setattr(_build, "_module_error", K.KernelBuildError("simulated build failure"))
    monkeypatch.setattr(K, "_warned_fallback", False)
    auto = torch.compile(lambda q: K.attention(q, q, q) + 0, backend="eager", fullgraph=True)
    with pytest.warns(RuntimeWarning, match="simulated build failure"):
        assert torch.equal(auto(qa), K.attention_reference(qa, qa, qa))
    explicit = torch.compile(lambda q: K.attention(q, q, q, backend="cuda") + 0, backend="eager", fullgraph=True)
    with pytest.raises(K.KernelBuildError, match="simulated build failure"):
        explicit(qa)

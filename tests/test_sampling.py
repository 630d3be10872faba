# pytest tests/test_sampling.py
"""Guided generation (DESIGN §4, CONTRACTS "Sampler token choice"): the token-choice contract against an
independent reference, sampling statistics on known logits, each sampler's commit rule against a plain loop,
CFG on known logits, batch invariance, EOS, infilling, and the ARM twin's KV cache."""

import math
from fractions import Fraction

import hypothesis
import numpy as np
import pytest
import torch
from hypothesis import strategies as st
from smdm import rng, sampling
from smdm.model import ModelConfig, build_model, config_by_name
from smdm.sampling import (
    CONFIDENCES,
    choose_tokens,
    choose_tokens_cpu,
    filter_logits,
    generate,
    infill,
    select_positions,
)

V = 64


class ToyModel(torch.nn.Module):
    """A "model" whose logits are a known function of the input: `fn(ids (B, L)) -> logits (B, L, V)`.
    `hidden` returns the logits themselves and `head` is the identity, as the sampler expects."""

    def __init__(self, fn, vocab=V):
        super().__init__()
        self.config = ModelConfig(n_layer=1, n_head=1, d_model=vocab, d_ff=1, vocab_size=vocab)
        self.fn = fn
        self.head = torch.nn.Identity()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.inputs = []

    def hidden(self, input_ids, **kwargs):
        self.inputs.append(input_ids.clone())
        return self.fn(input_ids).float()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread avoids OpenMP spin-waits on a busy machine (results compared within it)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def mdm():
    return build_model(config_by_name("tiny", vocab_size=V)).eval()


@pytest.fixture(scope="module")
def arm():
    return build_model(config_by_name("tiny", vocab_size=V, causal=True)).eval()


# ------------------------------------------------------------------------------------------------------------
# The token-choice contract


def test_int64_splitmix_and_key_match_the_rng_reference():
    xs = np.random.default_rng(0).integers(0, 2**63, size=200, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    got = sampling.splitmix64_t(torch.from_numpy(xs.view(np.int64))).numpy().view(np.uint64)
    assert np.array_equal(got, rng.splitmix64(xs))
    words = [(2**64 - 1, 3, 17, 6), (0, 0, 0, 0), (123456789, 2**40, 5, 7)]
    for w in words:
        assert int(sampling.key_t(*w)) & (2**64 - 1) == rng.key(*w)


def _reference_choice(logits, seed, step, pos, T):
    """Contract step 2 with the hashing written in smdm.rng's Python ints (independent of the torch
    implementation) and log as the pinned float32 op sequence `log_f32` of smdm.kernels._reference."""
    from smdm.kernels._reference import log_f32

    log = lambda x: log_f32(torch.tensor([x], dtype=torch.float32))[0]
    base = rng.key(seed, step, pos, rng.Stream.GUMBEL)
    best, best_v = -math.inf, None
    for v in range(len(logits)):
        h = rng.splitmix64(base ^ v)
        u = float(np.float32(np.float32(h >> 41) + np.float32(0.5)) * np.float32(2.0**-23))
        g = -log(-log(u))
        score = float(np.float32(np.float32(logits[v]) / np.float32(T)) + np.float32(g))
        if score > best:
            best, best_v = score, v
    return best_v


def test_gumbel_choice_matches_an_independent_reference():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 23, generator=gen)
    seeds = torch.tensor([7] * 20 + [2**62 + 5] * 20)
    pos = torch.arange(40) * 3
    tok, _ = choose_tokens(logits, seeds=seeds, positions=pos, step=11, temperature=0.7)
    ref = [_reference_choice(logits[n].tolist(), int(seeds[n]), 11, int(pos[n]), 0.7) for n in range(40)]
    assert tok.tolist() == ref


@pytest.mark.parametrize("choose_tokens", [choose_tokens, choose_tokens_cpu], ids=["torch", "rust"])
@pytest.mark.parametrize("T", [0.0, 0.7])
@pytest.mark.parametrize("confidence", ["prob", "margin", "entropy"])
def test_unfiltered_fast_path_is_bit_identical_to_the_kernel_reference(T, confidence, choose_tokens):
    from smdm.kernels._reference import choose_tokens_reference

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 300, generator=g) * 3
    logits[3, :] = 1.0  # all ties
    logits[5, 7:] = -math.inf
    args = dict(seeds=torch.arange(50) * 7, positions=torch.arange(50) + 100, step=4, temperature=T,
                confidence=confidence)
    tok, conf = choose_tokens(logits, top_k=None, top_p=None, **args)
    ref_tok, ref_conf = choose_tokens_reference(logits, top_k=None, top_p=None, **args)
    assert torch.equal(tok, ref_tok) and torch.equal(conf, ref_conf)
    tok_p, conf_p = choose_tokens(logits, top_k=None, top_p=1.0, **args)
    assert torch.equal(tok_p, ref_tok) and torch.equal(conf_p, ref_conf)
    # rows the kernel must also survive: a NaN, all -inf, one and two +inf, all NaN
    bad = torch.randn(5, 300, generator=g)
    bad[0, 5] = math.nan
    bad[1] = -math.inf
    bad[2, 9] = math.inf
    bad[3, [9, 20]] = math.inf
    bad[4] = math.nan
    args.update(seeds=torch.arange(5) * 7, positions=torch.arange(5) + 100)
    tok, conf = choose_tokens(bad, top_k=None, top_p=None, **args)
    ref_tok, ref_conf = choose_tokens_reference(bad, top_k=None, top_p=None, **args)
    assert torch.equal(tok, ref_tok)
    torch.testing.assert_close(conf, ref_conf, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("choose_tokens", [choose_tokens, choose_tokens_cpu], ids=["torch", "rust"])
@pytest.mark.parametrize("T", [1e-3, 1.0])
def test_unfiltered_fast_path_without_a_drawable_id_takes_the_argmax(T, choose_tokens):
    """Rows where no l/T + g is drawable (only NaN and -inf logits; every l/T overflowing to -inf at a small
    T): the reference (= the kernel) falls back to the argmax; the fast path used to return id 0."""
    from smdm.kernels._reference import choose_tokens_reference

    rows = torch.full((3, 5), -math.inf)
    rows[0, 2] = math.nan
    rows[1] = torch.tensor([-3.2e38, -3.1e38, -3.0e38, -3.3e38, -3.4e38])
    rows[2, 3] = math.nan
    rows[2, 4] = math.nan
    args = dict(seeds=torch.arange(3), positions=torch.arange(3), step=0, temperature=T, confidence="prob")
    tok, conf = choose_tokens(rows, **args)
    ref_tok, ref_conf = choose_tokens_reference(rows, **args)
    assert ref_tok[0] == 2 and ref_tok[2] == 3 and (T > 0.5 or ref_tok[1] == 2)
    assert torch.equal(tok, ref_tok)
    torch.testing.assert_close(conf, ref_conf, rtol=0, atol=0, equal_nan=True)


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(rows=st.integers(0, 40), vocab=st.integers(1, 700), scale=st.sampled_from([0.01, 1.0, 30.0, 1e30]),
       T=st.sampled_from([0.0, 1e-30, 0.3, 1.0, 2.5, 1e30]), confidence=st.sampled_from(CONFIDENCES),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**31),
       specials=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from([math.inf, -math.inf, math.nan])),
                         max_size=6),
       top_k=st.sampled_from([None, 0, 1, 2, 5, 50, 10**6]), top_p=st.sampled_from([None, 1.0, 0.95, 0.5, 1e-6]))
def test_rust_token_choice_is_bit_identical_to_the_reference(rows, vocab, scale, T, confidence, dtype, seed,
                                                            specials, top_k, top_p):
    """`choose_tokens_cpu` (rust/src/sampler.rs) against the PyTorch reference of the contract: the same tokens
    and the same confidence bits, over random shapes, magnitudes, temperatures, top-k / top-p, input dtypes,
    per-row seeds, steps and positions (negative and above 2^63 as bits), and rows with +-inf and NaN logits
    (ties too: bfloat16 and float16 inputs repeat values)."""
    from smdm.kernels._reference import choose_tokens_reference

    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * scale).to(dtype)
    for i, v in specials:
        if rows:
            logits.view(-1)[i % (rows * vocab)] = v
    args = dict(seeds=torch.randint(-2**63, 2**63 - 1, (rows,), generator=g),
                positions=torch.randint(0, 2**40, (rows,), generator=g),
                step=torch.randint(-5, 10**6, (rows,), generator=g), temperature=T, confidence=confidence,
                top_k=top_k, top_p=top_p)
    tok, conf = choose_tokens_cpu(logits, **args)
    ref_tok, ref_conf = choose_tokens_reference(logits, **args)
    assert tok.dtype == torch.int64 and conf.dtype == torch.float32
    assert torch.equal(tok, ref_tok)
    assert _same_bits(conf, ref_conf)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """float32 tensors equal bit for bit (-0.0 != +0.0), NaN where the other has NaN (any payload)."""
    na, nb = a.isnan(), b.isnan()
    return torch.equal(na, nb) and torch.equal(a.masked_fill(na, 0).view(torch.int32),
                                               b.masked_fill(nb, 0).view(torch.int32))


def test_rust_token_choice_in_parallel_and_its_errors():
    """Enough rows for the parallel path (rayon) give the same result as the reference; bad arguments name
    the argument."""
    from smdm import _core
    from smdm.kernels._reference import choose_tokens_reference

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(300, 2048, generator=g) * 4
    args = dict(seeds=torch.arange(300) % 7, positions=torch.arange(300), step=3, temperature=1.0,
                confidence="entropy")
    tok, conf = choose_tokens_cpu(logits, **args)
    ref_tok, ref_conf = choose_tokens_reference(logits, **args)
    assert torch.equal(tok, ref_tok) and _same_bits(conf, ref_conf)
    z = np.zeros(3, dtype=np.int64)
    with pytest.raises(ValueError, match="confidence must be"):
        choose_tokens_cpu(logits[:3], seeds=0, positions=0, step=0, confidence="p")
    with pytest.raises(ValueError, match="positions has 2 entries, logits has 3 rows"):
        _core.choose_tokens(logits[:3].numpy(), z, z, z[:2], 1.0, "prob")
    with pytest.raises(ValueError, match="temperature must be finite"):
        _core.choose_tokens(logits[:3].numpy(), z, z, z, math.nan, "prob")
    with pytest.raises(ValueError, match="vocab 0"):
        _core.choose_tokens(np.zeros((3, 0), dtype=np.float32), z, z, z, 1.0, "prob")
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.choose_tokens(logits[:3, ::2].numpy(), z, z, z, 1.0, "prob")
    with pytest.raises(ValueError, match="C-contiguous"):  # contiguous, but columns first: read as other rows
        _core.choose_tokens(np.asfortranarray(logits[:3].numpy()), z, z, z, 1.0, "prob")
    with pytest.raises(TypeError):
        _core.choose_tokens(logits[:3].double().numpy(), z, z, z, 1.0, "prob")


def test_generate_on_cpu_uses_the_rust_choice_and_matches_the_reference(monkeypatch):
    """The default CPU path is the Rust token choice (unless SMDM_KERNELS=reference), and a whole generation
    gives the same tokens either way."""
    assert sampling._dispatch("choose_tokens", torch.device("cpu")) is sampling.choose_tokens_cpu
    model = build_model(config_by_name("tiny", vocab_size=V, causal=False, max_seq_len=64), seed=4).eval()
    kw = dict(gen_length=12, steps=6, temperature=1.0, seed=[3, 4])
    with torch.no_grad():
        fast = {s: generate(model, [[1, 2, 3], [4]], sampler=s, **kw).sequences
                for s in ("ancestral", "low_confidence")}
        monkeypatch.setenv("SMDM_KERNELS", "reference")
        assert sampling._dispatch("choose_tokens", torch.device("cpu")) is sampling.choose_tokens
        ref = {s: generate(model, [[1, 2, 3], [4]], sampler=s, **kw).sequences
               for s in ("ancestral", "low_confidence")}
    assert fast == ref


def test_argmax_ties_lowest_id_and_confidences():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    tok, conf = choose_tokens(logits, seeds=torch.zeros(2), positions=torch.arange(2), step=0)
    assert tok.tolist() == [1, 0]
    p = torch.softmax(logits, -1)
    assert torch.allclose(conf, p[[0, 1], tok], rtol=2e-5)  # fixed-point normaliser: within 1.5e-5
    _, margin = choose_tokens(logits, seeds=torch.zeros(2), positions=torch.arange(2), step=0,
                              confidence="margin")
    assert margin.tolist() == [0.0, 0.0]
    _, negent = choose_tokens(logits, seeds=torch.zeros(2), positions=torch.arange(2), step=0,
                              confidence="entropy")
    assert torch.allclose(negent, (p * p.log()).sum(-1), rtol=1e-4)
    assert negent[1].item() == pytest.approx(-math.log(4), rel=1e-5)


def test_select_positions_equals_the_kernel_reference():
    """The commit rule is exact integer logic: identical to smdm.kernels' reference on ties and edge cases."""
    from smdm.kernels import select_positions_reference

    g = torch.Generator().manual_seed(0)
    conf = torch.randint(0, 4, (64, 12), generator=g).float() / 4  # many ties
    cand = torch.rand(64, 12, generator=g) < 0.7
    n = torch.randint(0, 13, (64,), generator=g)
    assert torch.equal(select_positions(conf, cand, n=n), select_positions_reference(conf, cand, n=n))
    assert torch.equal(select_positions(conf, cand, threshold=0.5),
                       select_positions_reference(conf, cand, threshold=0.5))


def test_top_k_top_p_filtering_rules():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    keep = lambda **kw: torch.isfinite(filter_logits(logits, **kw))[0].tolist()
    assert keep(top_k=2) == [False, True, False, True]
    assert keep(top_p=0.85) == [False, True, True, True]  # mass before id 2 is 0.8 < 0.85
    assert keep(top_p=0.6) == [False, True, False, True]
    assert keep(top_p=0.01) == [False, True, False, False]  # the top token is always kept
    assert keep(top_k=3, top_p=1.0) == [False, True, True, True]
    ties = torch.zeros(1, 5)
    assert torch.isfinite(filter_logits(ties, top_k=2))[0].tolist() == [True, True, False, False, False]


@pytest.mark.parametrize("T,top_k,top_p", [(1.0, None, None), (0.5, None, None), (1.0, 3, None),
                                           (1.0, None, 0.7), (2.0, 4, 0.9)])
def test_sampling_frequencies_match_the_filtered_distribution(T, top_k, top_p):
    """Draws over many positions (independent keys) follow softmax(filter(l) / T); excluded and
    zero-probability tokens are never drawn."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -math.inf, 1.5, -1.0])
    N = 20000
    tok, _ = choose_tokens(logits.expand(N, -1), seeds=torch.full((N,), 3), positions=torch.arange(N),
                           step=1, temperature=T, top_k=top_k, top_p=top_p)
    expected = torch.softmax(filter_logits(logits[None], top_k, top_p)[0].double() / T, -1)
    counts = torch.bincount(tok, minlength=len(logits)).double()
    assert counts[expected == 0].sum() == 0
    sigma = (N * expected * (1 - expected)).sqrt()
    assert ((counts - N * expected).abs() <= 5 * sigma + 1e-9).all(), (counts, N * expected)


def test_select_positions_count_and_threshold():
    conf = torch.tensor([[0.5, 0.9, 0.9, 0.1, 0.7], [0.2, 0.2, 0.2, 0.2, 0.2]])
    cand = torch.tensor([[True, True, True, True, False], [True, True, False, True, True]])
    got = select_positions(conf, cand, n=torch.tensor([2, 3]))
    assert got.tolist() == [[False, True, True, False, False], [True, True, False, True, False]]
    assert select_positions(conf, cand, n=torch.tensor([9, 0]))[0].tolist() == [True, True, True, True, False]
    got = select_positions(conf, cand, threshold=0.6)
    assert got.tolist() == [[False, True, True, False, False], [True, False, False, False, False]]


# ------------------------------------------------------------------------------------------------------------
# Known-logit tests with a toy model


def test_cfg_formula_and_unconditional_input(monkeypatch):
    """Guided logits u + (w + 1)(c - u), with u from the prompt-masked input in the same forward."""
    c_logits = torch.linspace(-1, 1, V)
    u_logits = torch.linspace(1, -1, V) ** 2

    def fn(ids):  # conditional when the prompt (position 0) is visible
        uncond = (ids[:, :1] == V).float()[..., None]  # (B, 1, 1)
        return (uncond * u_logits + (1 - uncond) * c_logits).expand(ids.shape[0], ids.shape[1], V)

    model = ToyModel(fn)
    seen = []
    real = sampling.choose_tokens
    monkeypatch.setenv("SMDM_KERNELS", "reference")  # the PyTorch choice, whose logits this test records
    monkeypatch.setattr(sampling, "choose_tokens",
                        lambda logits, **kw: (seen.append(logits), real(logits, **kw))[1])
    w = 1.5
    generate(model, [[1, 2, 3]], gen_length=4, steps=2, cfg_scale=w)
    assert len(model.inputs) == 2 and all(x.shape[0] == 2 for x in model.inputs)  # one batched call a step
    x = model.inputs[0]
    assert x[0, :3].tolist() == [1, 2, 3] and x[1, :3].tolist() == [V, V, V]  # prompt masked
    assert torch.equal(x[0, 3:7], x[1, 3:7])
    assert torch.allclose(seen[0], (u_logits + (w + 1) * (c_logits - u_logits)).expand(4, V))
    model.inputs.clear()
    generate(model, [[1, 2, 3]], gen_length=4, steps=2, cfg_scale=0.0)
    assert model.inputs[0].shape[0] == 1  # w = 0: no unconditional row


def _mask_trace(model, **kw):
    trace = []
    out = generate(model, callback=lambda step, seqs: trace.append([int((s == V).sum()) for s in seqs]), **kw)
    return out, trace


def test_llada_block_quota():
    model = ToyModel(lambda ids: torch.randn(ids.shape[0], ids.shape[1], V, generator=torch.Generator()
                                             .manual_seed(int(ids.sum()))))
    G, B, S = 24, 8, 6  # 3 blocks of 8 masks, 2 steps each... use uneven: 8 masks over 2 steps
    for blocks, steps in [(8, 6), (8, 9), (24, 5), (6, 16)]:
        _, trace = _mask_trace(model, prompts=[[1]], gen_length=G, steps=steps, block_length=blocks)
        left = [G] + [t[0] for t in trace]
        commits = [a - b for a, b in zip(left, left[1:])]
        s = steps // (G // blocks)
        expected = [blocks // s + (1 if i < blocks % s else 0) for _ in range(G // blocks) for i in range(s)]
        assert commits == expected, (blocks, steps)
    del B, S


def test_low_confidence_quota_is_floor_m_times_1_minus_s_over_t():
    model = ToyModel(lambda ids: torch.zeros(ids.shape[0], ids.shape[1], V))
    G, S = 23, 7
    _, trace = _mask_trace(model, prompts=[[1]], gen_length=G, steps=S)
    left = [G] + [t[0] for t in trace]
    for i in range(S):  # exact rational floor(m (1 - s/t)), t = 1 - i/S, s = 1 - (i+1)/S
        t, s = 1 - Fraction(i, S), 1 - Fraction(i + 1, S)
        assert left[i] - left[i + 1] == math.floor(left[i] * (1 - s / t))
    assert left[-1] == 0


def test_ancestral_reveal_probability_and_exact_caching():
    """Each masked position is revealed with probability (t - s)/t = 1/(S - i); a step that reveals nothing
    costs no forward pass."""
    model = ToyModel(lambda ids: torch.zeros(ids.shape[0], ids.shape[1], V))
    S, G, n_seeds = 4, 64, 40
    out, trace = _mask_trace(model, prompts=[[1]] * n_seeds, gen_length=G, steps=S, sampler="ancestral",
                             seed=list(range(n_seeds)))
    left = np.array([[G] * n_seeds] + trace, dtype=np.float64)  # (S + 1, rows)
    for i in range(S - 1):
        m = left[i].sum()
        p = 1.0 / (S - i)
        revealed = m - left[i + 1].sum()
        assert abs(revealed - m * p) <= 5 * math.sqrt(m * p * (1 - p)), (i, revealed, m * p)
    assert left[-1].sum() == 0
    # many more steps than tokens: most steps reveal nothing and reuse the logits
    model.inputs.clear()
    out = generate(model, [[1]], gen_length=6, steps=300, sampler="ancestral", seed=5)
    assert out.steps[0] <= 300 and out.forward_passes == len(model.inputs) <= 6


@pytest.mark.parametrize("sampler,chosen", [("ancestral", "revealed"), ("low_confidence", "masked")])
def test_ancestral_chooses_tokens_only_at_revealed_positions(mdm, monkeypatch, sampler, chosen):
    """Ancestral reveal coins ignore tokens, so each position's token is chosen once, at the step that reveals
    it (the rows chosen over a run = the generated tokens); confidence samplers choose at every masked
    position of every step. Either way the output equals the PyTorch reference path's."""
    seen = []
    real = sampling.choose_tokens
    monkeypatch.setenv("SMDM_KERNELS", "reference")
    monkeypatch.setattr(sampling, "choose_tokens", lambda logits, **kw: (seen.append(len(logits)),
                                                                         real(logits, **kw))[1])
    kw = dict(gen_length=16, steps=8, sampler=sampler, temperature=1.0, seed=[1, 2])
    out = generate(mdm, [[1, 2, 3], [4]], **kw)
    if chosen == "revealed":
        assert sum(seen) == 2 * 16
    else:
        assert sum(seen) > 2 * 16 and seen[0] == 2 * 16
    monkeypatch.undo()
    assert generate(mdm, [[1, 2, 3], [4]], **kw).sequences == out.sequences  # the Rust path, default


def test_eos_early_stop_fills_and_frees_the_row():
    eos = 7

    def fn(ids):  # EOS very likely at position 3 of every row, token 9 elsewhere
        logits = torch.zeros(ids.shape[0], ids.shape[1], V)
        logits[:, :, 9] = 5.0
        logits[:, 3, eos] = 20.0
        return logits

    model = ToyModel(fn)
    out = generate(model, [[1, 2], [1, 2, 3, 4, 5, 6]], gen_length=12, steps=12, eos_id=eos)
    assert out.tokens[0] == [9] and out.sequences[0][3:] == [eos] * 11
    assert out.tokens[1] == [9] * 12  # position 3 is in its prompt
    assert out.row_forward_passes[0] < out.row_forward_passes[1]
    assert out.generated_tokens == 2 + 12


def test_sequences_after_the_first_eos_are_eos_even_if_committed_before_it():
    eos = 7

    def fn(ids):  # position 6 commits token 9 first, then position 2 (9), then EOS at position 3
        logits = torch.zeros(ids.shape[0], ids.shape[1], V)
        logits[:, 6, 9], logits[:, 2, 9], logits[:, 3, eos] = 30.0, 25.0, 20.0
        return logits

    out = generate(ToyModel(fn), [[1, 2]], gen_length=6, steps=6, eos_id=eos)
    assert out.tokens == [[9]] and out.sequences == [[1, 2, 9] + [eos] * 5]


def test_infill_eos_rule_covers_only_the_trailing_masks():
    """An EOS committed in a hole that given text follows, or an EOS given in the text, ends nothing: later
    holes are sampled, not filled with EOS. A trailing run of masks is generation: same tokens and counts as
    `generate`."""
    eos = 7

    def fn(ids):  # EOS very likely at position 2, token 9 elsewhere
        logits = torch.zeros(ids.shape[0], ids.shape[1], V)
        logits[:, :, 9] = 5.0
        logits[:, 2, eos] = 20.0
        return logits

    model = ToyModel(fn)
    out = infill(model, [[1, V, V, V, 4, 5, V, V, V], [eos, 2, 3, 6, 4, 5, V, V, V]], eos_id=eos)
    assert out.tokens == [[1, 9, eos, 9, 4, 5, 9, 9, 9], [eos, 2, 3, 6, 4, 5, 9, 9, 9]]
    assert out.generated_tokens == 6 + 3
    assert infill(model, [[V, 1, eos, 2, V, V]], eos_id=eos).tokens == [[9, 1, eos, 2, 9, 9]]
    both = infill(model, [[1] + [V] * 8], steps=8, eos_id=eos)
    gen = generate(model, [[1]], gen_length=8, steps=8, eos_id=eos)
    assert both.tokens == gen.sequences == [[1, 9, eos] + [eos] * 6]
    assert (both.generated_tokens, both.forward_passes) == (gen.generated_tokens, gen.forward_passes) == (2, 2)


# ------------------------------------------------------------------------------------------------------------
# Each sampler's commit rule against a plain per-sequence loop (real Transformer, temperature 0)


def _logits_of(model, seq):
    """The forward the sampler uses: the row padded to a multiple of PAD_MULTIPLE with key_valid."""
    L = len(seq)
    Lp = -(-L // sampling.PAD_MULTIPLE) * sampling.PAD_MULTIPLE
    x = torch.zeros(1, Lp, dtype=torch.int64)
    x[0, :L] = torch.tensor(seq)
    valid = torch.zeros(1, Lp, dtype=torch.bool)
    valid[0, :L] = True
    with torch.no_grad():
        return model(x, key_valid=valid)[0, :L].float()


def _reference_loop(model, prompt, G, S, sampler, block_length=None, tau=None, seed=0):
    seq = list(prompt) + [V] * G
    blocks = [list(range(len(prompt), len(prompt) + G))]
    if block_length:
        blocks = [blocks[0][k:k + block_length] for k in range(0, G, block_length)]
    step, forwards, logits, last_masks = 0, 0, None, None
    for block in blocks:
        s_blk = S // len(blocks)
        m_blk = sum(seq[j] == V for j in block)
        i = 0
        while any(seq[j] == V for j in block):
            masks = sum(t == V for t in seq)
            if masks != last_masks:
                logits, last_masks, forwards = _logits_of(model, seq), masks, forwards + 1
            cand = [j for j in block if seq[j] == V]
            probs = torch.softmax(logits, -1)
            tok = {j: int(torch.argmax(logits[j])) for j in cand}
            conf = {j: float(probs[j, tok[j]]) for j in cand}
            ranked = sorted(cand, key=lambda j: (-conf[j], j))
            if sampler == "ancestral":
                commit = [j for j in cand
                          if rng.uniform(rng.key(seed, step, j, sampling.REVEAL_STREAM)) < 1 / (s_blk - i)]
            elif sampler == "threshold":
                commit = [j for j in cand if conf[j] >= tau] + [ranked[0]]
            elif block_length:
                commit = ranked[:m_blk // s_blk + (i < m_blk % s_blk)]
            else:
                t, s = 1 - Fraction(i, S), 1 - Fraction(i + 1, S)
                commit = ranked[:math.floor(len(cand) * (1 - s / t))]
            for j in commit:
                seq[j] = tok[j]
            step, i = step + 1, i + 1
    return seq[len(prompt):], forwards


@pytest.mark.parametrize("kw", [dict(sampler="low_confidence"), dict(sampler="ancestral"),
                                dict(sampler="low_confidence", block_length=4),
                                dict(sampler="ancestral", block_length=8),
                                dict(sampler="threshold", threshold=0.03, block_length=8)],
                         ids=["low_confidence", "ancestral", "blocks", "ancestral-blocks", "threshold"])
def test_sampler_matches_plain_reference_loop(mdm, kw):
    prompt, G, S = [3, 1, 4, 1, 5], 16, 8
    out = generate(mdm, [prompt], gen_length=G, steps=S, seed=3, **kw)
    ref, forwards = _reference_loop(mdm, prompt, G, S, kw["sampler"], kw.get("block_length"),
                                    kw.get("threshold"), seed=3)
    assert out.tokens[0] == ref
    assert out.forward_passes == forwards


# ------------------------------------------------------------------------------------------------------------
# Batch invariance: a prompt alone or in any batch, at any position -> identical tokens


# lengths 1, 7, 37, 16, 70 (+16 generated: padded to 64 alone, to 128 next to the 70) and a second 7 (a group
# of equal shapes for the prefix cache)
PROMPTS = [[5], [1, 2, 3, 4, 5, 6, 7], list(range(2, 39)), list(range(9, -1, -1)) + list(range(11, 17)),
           [i * 7 % 60 for i in range(70)], [2, 9, 4, 4, 1, 0, 3]]


@pytest.mark.parametrize("kw", [
    dict(sampler="low_confidence"),
    dict(sampler="low_confidence", temperature=1.0, top_k=20, top_p=0.9),
    dict(sampler="ancestral", temperature=0.8),
    dict(sampler="low_confidence", block_length=8, confidence="margin"),
    dict(sampler="threshold", threshold=0.05, block_length=8, temperature=1.0),
    dict(sampler="low_confidence", cfg_scale=1.0, temperature=1.0),
    dict(sampler="low_confidence", block_length=8, cache="prefix", temperature=1.0, confidence="entropy"),
    dict(sampler="threshold", threshold=0.05, block_length=4, cache="dual", temperature=1.0, cfg_scale=0.5),
], ids=["greedy", "topk-topp", "ancestral", "blocks-margin", "threshold", "cfg", "prefix-cache", "dual-cache"])
def test_batch_invariance(mdm, kw):
    G = 16
    alone = [generate(mdm, [p], gen_length=G, steps=8, seed=11, **kw).tokens[0] for p in PROMPTS]
    batch = generate(mdm, PROMPTS, gen_length=G, steps=8, seed=11, **kw).tokens
    assert batch == alone
    order = [2, 5, 0, 3, 1]
    shuffled = generate(mdm, [PROMPTS[i] for i in order] + [PROMPTS[0]], gen_length=G, steps=8,
                        seed=[11] * 6, **kw).tokens
    assert shuffled == [alone[i] for i in order] + [alone[0]]


def _record_logits(monkeypatch):
    """Every guided logits row the sampler's token choice sees, by (seed, step, position)."""
    seen = {}
    real = sampling.choose_tokens

    def record(logits, *, seeds, positions, step, **rest):
        for n in range(len(logits)):
            seen[(int(seeds[n]), int(step), int(positions[n]))] = logits[n].clone()
        return real(logits, seeds=seeds, positions=positions, step=step, **rest)

    monkeypatch.setenv("SMDM_KERNELS", "reference")  # the PyTorch choice, whose logits `record` sees
    monkeypatch.setattr(sampling, "choose_tokens", record)
    return seen


@pytest.mark.parametrize("which,kw", [("mdm", dict()), ("mdm", dict(cfg_scale=2.0)),
                                      ("mdm", dict(block_length=8, cache="prefix")),
                                      ("mdm", dict(block_length=2, steps=8, gen_length=4, cache="prefix")),
                                      ("mdm", dict(block_length=4, cache="dual", cfg_scale=1.0)),
                                      ("arm", dict(cache="prefix")), ("arm", dict(cache="none"))])
def test_batch_invariance_of_the_logits_bits(mdm, arm, monkeypatch, which, kw):
    """Stronger than equal tokens: every guided logit a row sees is bit-identical alone and in a batch
    (catches 1e-7 differences that rarely flip a token: padding, small-M GEMM kernels)."""
    model = mdm if which == "mdm" else arm
    kw = {"gen_length": 16, "steps": 8, **kw}
    seen = _record_logits(monkeypatch)
    seeds = list(range(100, 100 + len(PROMPTS)))
    for p, sd in zip(PROMPTS, seeds):
        generate(model, [p], seed=sd, **kw)
    alone = dict(seen)
    seen.clear()
    generate(model, PROMPTS, seed=seeds, **kw)
    assert alone and alone.keys() == seen.keys()
    assert all(torch.equal(alone[k], seen[k]) for k in alone)


@pytest.mark.parametrize("which,kw", [("mdm", dict(gen_length=8, steps=4)),
                                      ("arm", dict(cache="prefix", gen_length=6))])
def test_batch_invariance_of_the_logits_bits_two_threads(mdm, arm, monkeypatch, which, kw):
    """With 2 threads MKL splits a GEMM's rows per thread: tails of 1..3 rows must never happen (they did
    before the row-multiple padding: the head's rows 8-9 of 10, the ARM's decode batch)."""
    torch.set_num_threads(2)
    try:
        test_batch_invariance_of_the_logits_bits(mdm, arm, monkeypatch, which, kw)
    finally:
        torch.set_num_threads(1)


def test_per_prompt_seeds_and_temperature_change_draws(mdm):
    a = generate(mdm, [[1, 2], [1, 2]], gen_length=12, steps=6, temperature=1.0, seed=[0, 1]).tokens
    b = generate(mdm, [[1, 2]], gen_length=12, steps=6, temperature=1.0, seed=1).tokens
    assert a[1] == b[0] and a[0] != a[1]


# ------------------------------------------------------------------------------------------------------------
# Infilling, caches, the ARM twin, validation


def test_infill_keeps_given_tokens(mdm):
    ids = [[1, 2, 3, V, V, V, V, 8, 9], [4, V, 6]]
    out = infill(mdm, ids, steps=None)
    for given, filled in zip(ids, out.tokens):
        assert len(filled) == len(given) and V not in filled
        assert all(g == f for g, f in zip(given, filled) if g != V)
    single = infill(mdm, [1, 2, 3, 0, 0, 0, 0, 8, 9], mask_positions=[3, 4, 5, 6])
    assert single.tokens[0] == out.tokens[0]
    blocks = infill(mdm, ids, steps=4, block_length=2, cfg_scale=0.5)
    assert all(V not in t for t in blocks.tokens)
    # rows as numpy arrays (a list of them, or one 2-D array) are a batch, as lists are
    assert infill(mdm, [np.array(x) for x in ids]).tokens == out.tokens
    assert infill(mdm, np.array([ids[0], ids[0]])).tokens == [out.tokens[0]] * 2
    # one sequence as a 1-D tensor or array, as one list is (a 1-D tensor raised TypeError: iteration over a
    # 0-d tensor); any value stands at an explicit mask position, but one past int64 is named, not an overflow
    assert infill(mdm, torch.tensor(ids[0])).tokens == infill(mdm, np.array(ids[0])).tokens == [out.tokens[0]]
    assert infill(mdm, [1, 2, 3, -1, -1, -1, -1, 8, 9], mask_positions=[3, 4, 5, 6]).tokens == [out.tokens[0]]
    with pytest.raises(ValueError, match=f"sequence 0 holds token id {2**70} outside"):
        infill(mdm, [1, 2**70, V])
    # nothing masked anywhere is a forgotten mark, as `smdm infill` says (it returned the input unchanged);
    # a batch where only some rows have holes is fine
    for no_holes in ([1, 2, 3], [[1, 2], [3]]):
        with pytest.raises(ValueError, match="nothing to fill"):
            infill(mdm, no_holes)
    assert infill(mdm, [[1, 2], [4, V, 6]]).tokens[0] == [1, 2]


def test_a_top_k_of_the_vocabulary_or_more_keeps_every_id(mdm, arm):
    """top_k >= the logits' width filters nothing on every path; one past a C long reached the Rust sampler
    as an OverflowError traceback (and SMDM_KERNELS=reference returned tokens)."""
    kw = dict(gen_length=6, temperature=1.0, seed=3)
    for model, extra in ((mdm, dict(steps=3)), (arm, {})):
        want = generate(model, [[1, 2]], **kw, **extra).tokens
        for k in (V, V + 1, 2**63, 2**80):
            assert generate(model, [[1, 2]], top_k=k, **kw, **extra).tokens == want, k
    assert infill(mdm, [1, V, V, 4], top_k=2**63, temperature=1.0).tokens == infill(mdm, [1, V, V, 4],
                                                                                    temperature=1.0).tokens


def test_prefix_cache_runs_the_block_not_the_prefix(mdm):
    out = generate(mdm, [list(range(30))], gen_length=16, steps=8, block_length=8, cache="prefix")
    assert len(out.tokens[0]) == 16 and out.forward_passes == 8


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("kw", [dict(sampler="low_confidence", block_length=4, steps=8),
                                dict(sampler="threshold", threshold=0.3, block_length=4, cfg_scale=1.5),
                                dict(sampler="low_confidence", steps=8)])
def test_block_caches_are_exact_for_one_layer(monkeypatch, cache, kw):
    """In a one-layer model a key/value depends only on its own token and position, and inside a block the
    kept positions do not change (prefix: committed; suffix: still masks, or given text): so both caches
    must give the no-cache logits at every step (up to summation order). Checks what the kept slots hold,
    their RoPE positions and validity, for generation with CFG and for infill with text after the holes."""
    model = build_model(ModelConfig(n_layer=1, n_head=2, d_model=32, d_ff=64, vocab_size=V)).eval()
    prompts, seeds = [[5, 9, 2], list(range(20, 31))], [3, 4]
    holes = [[1, 2, V, V, V, 7, V, V, 9, 9, 4], [V, V, V, V, 3, 3]]
    runs = {}
    for c in ("none", cache):
        seen = _record_logits(monkeypatch)
        gen = generate(model, prompts, gen_length=16, seed=seeds, cache=c, temperature=1.0, **kw)
        filled = infill(model, holes, seed=seeds, cache=c, temperature=1.0,
                        **{k: v for k, v in kw.items() if k != "steps"})
        runs[c] = (gen.tokens, filled.tokens, gen.row_forward_passes, dict(seen))
    (t0, f0, n0, s0), (t1, f1, n1, s1) = runs["none"], runs[cache]
    assert s0.keys() == s1.keys()
    assert all(torch.allclose(s0[k], s1[k], atol=1e-5, rtol=1e-5) for k in s0)
    assert (t1, f1, n1) == (t0, f0, n0)
    # EOS: a token the model generates at position 5 of row 0, so that row stops early, the same way cached
    eos_runs = [generate(model, prompts, gen_length=16, seed=seeds, cache=c, temperature=1.0, eos_id=t0[0][5], **kw)
                for c in ("none", cache)]
    assert len(eos_runs[0].tokens[0]) <= 5
    assert [(e.sequences, e.row_forward_passes) for e in eos_runs] == [(eos_runs[0].sequences,
                                                                        eos_runs[0].row_forward_passes)] * 2


def test_dual_cache_runs_the_block_alone(mdm, monkeypatch):
    """cache="dual": the first step of a block runs the whole sequence; the others run only the block (the
    prefix cache also runs what follows the block), against kept keys of every other position."""
    calls = []
    real = mdm.hidden

    def spy(x, **kw):
        calls.append((x.shape[1], kw.get("cache_pos", 0), None if kw.get("kv_cache") is None
                      else kw["kv_cache"].k[0].shape[2]))
        return real(x, **kw)

    monkeypatch.setattr(mdm, "hidden", spy)
    torch.set_num_threads(1)  # the query chunk is padded to a multiple of 4 x threads
    for cache in ("prefix", "dual"):
        calls.clear()
        out = generate(mdm, [list(range(30))], gen_length=16, steps=8, block_length=8, cache=cache)
        assert out.forward_passes == 8 and len(out.tokens[0]) == 16
        full = [c for c in calls if c[1] == 0]
        part = [c for c in calls if c[1] != 0]
        assert len(full) == 2 and len(part) == 6  # 2 blocks x 4 steps
        if cache == "prefix":  # block 0: 16 queries after 30 kept; block 1: 8 after 38
            assert sorted(set(part)) == [(8, 38, 46), (16, 30, 46)]
        else:  # 8 queries against the 38 other positions
            assert set(part) == {(8, 38, 46)}


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cache_refresh_rebuilds_the_kept_kv_every_n_passes(monkeypatch, cache):
    """cache_refresh=N: in each block the forwards at block steps 0, N, 2N, ... run the whole sequence and
    rebuild the kept K/V, the others run the block's chunk. N=1 runs every pass in full, so a two-layer model
    (where the kept K/V are stale otherwise) gets the uncached logits and tokens, with CFG, for generate and
    for infill with text after the holes."""
    model = build_model(ModelConfig(n_layer=2, n_head=2, d_model=32, d_ff=64, vocab_size=V)).eval()
    calls = []
    real = model.hidden

    def spy(x, **kw):
        calls.append(kw.get("cache_pos", 0) == 0 and kw.get("kv_cache") is not None)
        return real(x, **kw)

    monkeypatch.setattr(model, "hidden", spy)
    prompts, seeds = [[5, 9, 2], list(range(20, 31))], [3, 4]
    kw = dict(gen_length=16, steps=16, block_length=8, temperature=1.0, seed=seeds, cfg_scale=1.0)
    for n, full in ((2, [True, False] * 8), (3, ([True, False, False] * 3)[:8] * 2), (8, ([True] + [False] * 7) * 2)):
        calls.clear()
        generate(model, [prompts[0]], cache=cache, cache_refresh=n, **kw | dict(seed=3))
        assert calls == full, (n, calls)
    runs = {}
    for c, refresh in (("none", None), (cache, 1), (cache, None)):
        seen = _record_logits(monkeypatch)
        gen = generate(model, prompts, cache=c, cache_refresh=refresh, **kw)
        filled = infill(model, [[1, 2, V, V, V, 7, V, V, 9, 9, 4]], cache=c, cache_refresh=refresh, block_length=2,
                        temperature=1.0, seed=5)
        runs[c, refresh] = (gen.tokens, filled.tokens, dict(seen))
        monkeypatch.undo()
        monkeypatch.setattr(model, "hidden", spy)
    (t0, f0, s0), (t1, f1, s1), (_, _, s2) = runs["none", None], runs[cache, 1], runs[cache, None]
    assert s0.keys() == s1.keys() and all(torch.allclose(s0[k], s1[k], atol=1e-5, rtol=1e-5) for k in s0)
    assert (t1, f1) == (t0, f0)
    assert any(not torch.allclose(s0[k], s2[k], atol=1e-3) for k in s0 if k in s2)  # stale without refresh


def test_cache_refresh_is_checked(mdm, arm):
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="cache_refresh must be an int >= 1"):
            generate(mdm, [[1]], gen_length=4, block_length=2, cache="dual", cache_refresh=bad)
    with pytest.raises(ValueError, match="block caches"):
        generate(mdm, [[1]], gen_length=4, cache_refresh=2)
    with pytest.raises(ValueError, match="block caches"):
        generate(arm, [[1]], gen_length=4, cache_refresh=2)
    with pytest.raises(ValueError, match="block caches"):
        infill(mdm, [1, V, 2], cache_refresh=1)
    out = generate(mdm, [[1]], gen_length=4, block_length=2, cache="dual", cache_refresh=np.int64(2))  # as seeds
    assert out.tokens == generate(mdm, [[1]], gen_length=4, block_length=2, cache="dual", cache_refresh=2).tokens


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_block_caches_through_the_fused_attention_path(mdm, cache):
    """The kept K/V reach the fused kernel's interface (segment ids; its PyTorch reference on the CPU) as they
    reach SDPA: same tokens, with CFG and ragged prompts."""
    kw = dict(gen_length=16, steps=8, block_length=4, cache=cache, cfg_scale=1.0, temperature=1.0, seed=[1, 2])
    out = {}
    try:
        for impl in ("sdpa", "fused"):
            mdm.attention = impl
            out[impl] = generate(mdm, [[1, 2, 3], list(range(5, 25))], **kw).tokens
    finally:
        mdm.attention = "auto"
    assert out["fused"] == out["sdpa"]


def test_dual_cache_is_for_the_mdm(arm):
    with pytest.raises(ValueError, match="MDM only"):
        generate(arm, [[1, 2]], gen_length=4, cache="dual")


@pytest.mark.parametrize("kw", [dict(), dict(temperature=1.0, top_k=10), dict(temperature=0.7, top_p=0.8)])
def test_arm_kv_cache_equals_no_cache(arm, kw):
    prompts = [[1, 2, 3], [4], list(range(10, 30)), [7, 7, 7]]
    seeds = [1, 2, 3, 4]
    a = generate(arm, prompts, gen_length=12, cache="prefix", seed=seeds, **kw)
    b = generate(arm, prompts, gen_length=12, cache="none", seed=seeds, **kw)
    assert a.tokens == b.tokens
    alone = [generate(arm, [p], gen_length=12, cache="prefix", seed=s, **kw).tokens[0]
             for p, s in zip(prompts, seeds)]
    assert a.tokens == alone
    assert a.forward_passes == 3 * 12  # one prefill + 11 decode steps per prompt-length group


def test_arm_eos_stop(arm):
    first = generate(arm, [[1, 2, 3]], gen_length=8).tokens[0]
    eos = first[2]
    out = generate(arm, [[1, 2, 3]], gen_length=8, eos_id=eos, cache="prefix")
    cut = first[:first.index(eos)]
    assert out.tokens[0] == cut and out.sequences[0][3 + len(cut):] == [eos] * (8 - len(cut))
    assert out.steps == [len(cut) + 1]


@pytest.mark.parametrize("kw,msg", [
    (dict(steps=0), "steps"), (dict(block_length=5), "divide"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(sampler="threshold"), "threshold"), (dict(sampler="nope"), "sampler"),
    (dict(gen_length=600), "context"), (dict(cache="full"), "cache"), (dict(temperature=-1), "temperature"),
    (dict(block_length=4, steps=3), "multiple"), (dict(confidence="x"), "confidence"),
])
def test_bad_options_raise(mdm, kw, msg):
    args = dict(gen_length=16, steps=8)
    args.update(kw)
    with pytest.raises(ValueError, match=msg):
        generate(mdm, [[1, 2]], **args)


def test_bad_prompts_raise(mdm, arm):
    with pytest.raises(ValueError, match="outside"):
        generate(mdm, [[1, V]], gen_length=4, steps=4)
    with pytest.raises(ValueError, match="empty"):
        generate(arm, [[]], gen_length=4)
    with pytest.raises(ValueError, match="cfg_scale"):
        generate(arm, [[1]], gen_length=4, cfg_scale=1.0)
    with pytest.raises(ValueError, match="seed"):
        generate(mdm, [[1], [2]], gen_length=4, steps=4, seed=[1])
    with pytest.raises(ValueError, match="list of token-id lists"):
        generate(mdm, [1, 2, 3], gen_length=4, steps=4)
    with pytest.raises(ValueError, match="list of token-id lists"):
        generate(mdm, torch.tensor([1, 2, 3]), gen_length=4, steps=4)
    with pytest.raises(ValueError, match="'greedy'"):  # unused by the ARM, but a typo is still an error
        generate(arm, [[1]], gen_length=4, sampler="greedy")
    with pytest.raises(ValueError, match="'probability'"):
        generate(arm, [[1]], gen_length=4, confidence="probability")


def test_numpy_integer_seeds(mdm):
    kw = dict(gen_length=6, steps=3, temperature=1.0)
    want = generate(mdm, [[1, 2], [3]], seed=5, **kw).tokens
    assert generate(mdm, [[1, 2], [3]], seed=np.int64(5), **kw).tokens == want
    assert generate(mdm, [[1, 2], [3]], seed=np.array([5, 5]), **kw).tokens == want


def test_more_steps_than_tokens_and_callback(mdm):
    """Steps that commit nothing cost no forward pass (unchanged input); the callback sees each step, as
    copies a trajectory can keep (they were the live rows: every kept step showed the final state)."""
    seen, kept = [], []
    out = generate(mdm, [[1, 2]], gen_length=4, steps=12,
                   callback=lambda i, seqs: (seen.append(i), kept.append(seqs[0])))
    assert out.steps == [12] and out.forward_passes == 4 and seen == list(range(1, 13))
    masks = [int((s == mdm.config.mask_id).sum()) for s in kept]
    assert masks[0] >= 3 and masks[-1] == 0 and masks == sorted(masks, reverse=True), masks


# ------------------------------------------------------------------------------------------------------------
# Noise schedules: how many positions a step reveals (docs/CONTRACTS.md "Samplers and schedules")

from smdm.diffusion import parse_schedule  # noqa: E402
from smdm.sampling import commit_count, reveal_probability  # noqa: E402


def _q_cosine(i, S):
    """(alpha_s - alpha_t)/(1 - alpha_t) for alpha = cos(pi t/2), written independently of the library."""
    t, s = 1 - i / S, 1 - (i + 1) / S
    a_t, a_s = math.cos(math.pi / 2 * t), math.cos(math.pi / 2 * s)
    return (a_s - a_t) / (1 - a_t)


def test_linear_step_rule_is_unchanged():
    lin = parse_schedule("linear")
    for S in range(1, 41):
        for i in range(S):
            assert reveal_probability(lin, i, S) == 1.0 / (S - i)
            for m in range(0, 120, 7):
                assert commit_count(m, lin, i, S) == m // (S - i)


def test_polynomial_commit_count_is_the_exact_rational_floor():
    """t^2: q = 1 - (s/t)^2 is rational, floor(m q) checked in exact arithmetic (many products are integers
    that float64 misses by an ulp; COMMIT_EPS must restore them, and never more)."""
    sch = parse_schedule("polynomial:2")
    for S in range(1, 41):
        for i in range(S):
            t, s = 1 - Fraction(i, S), 1 - Fraction(i + 1, S)
            q = 1 - (s / t) ** 2
            assert abs(reveal_probability(sch, i, S) - q) < 1e-15
            for m in range(0, 150):
                assert commit_count(m, sch, i, S) == (m if i == S - 1 else math.floor(m * q)), (m, i, S)


def _q_exact(name, i, S):
    """q = (alpha_s - alpha_t)/(1 - alpha_t) in 50-digit arithmetic (mpmath), from alpha itself."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 50
    t, s = 1 - mp.mpf(i) / S, 1 - mp.mpf(i + 1) / S
    if name == "cosine":
        alpha = lambda x: mp.cos(mp.pi / 2 * x)  # noqa: E731
    else:
        power = mp.mpf(name.split(":")[1])
        alpha = lambda x: 1 - x**power  # noqa: E731
    return (alpha(s) - alpha(t)) / (1 - alpha(t))


@pytest.mark.parametrize("name", ["cosine", "polynomial:0.5", "polynomial:2.5", "polynomial:3"])
def test_commit_counts_follow_the_formula_and_finish_at_the_last_step(name):
    """q within ~10 ulps of the 50-digit value; n = floor(m q) of the real number (no product lies within
    1e-9 of an integer here unless it is one); every row is fully committed at the last step."""
    import mpmath

    sch = parse_schedule(name)
    for S in (1, 2, 3, 7, 16, 64, 1000):
        steps = range(S) if S < 100 else [0, 1, 500, 997, 998, 999]
        for i in steps:
            q = reveal_probability(sch, i, S)
            assert (q == 1.0) == (i == S - 1) and 0 < q <= 1
            if i < S - 1:
                qe = _q_exact(name, i, S)
                assert abs(q - qe) <= 2e-15 * qe, (name, i, S, q, qe)  # ~10 ulps
                for m in (1, 2, 5, 23, 100, 4096, 10**5):
                    assert commit_count(m, sch, i, S) == int(mpmath.floor(m * qe + mpmath.mpf(10) ** -30))
        for m0 in (0, 1, 5, 23, 100, 1000):
            m = m0
            for i in range(S):
                n = commit_count(m, sch, i, S)
                assert 0 <= n <= m
                m -= n
            assert m == 0
    # a product that is a whole number in exact arithmetic: cosine, S = 3, i = 0 has q = 1/2
    if name == "cosine":
        assert [commit_count(m, sch, 0, 3) for m in range(2, 12, 2)] == [1, 2, 3, 4, 5]


def test_low_confidence_follows_the_cosine_schedule():
    model = ToyModel(lambda ids: torch.zeros(ids.shape[0], ids.shape[1], V))
    G, S = 23, 7
    _, trace = _mask_trace(model, prompts=[[1]], gen_length=G, steps=S, schedule="cosine")
    left = [G] + [t[0] for t in trace]
    assert left[-1] == 0 and len(left) == S + 1
    for i in range(S - 1):
        assert left[i] - left[i + 1] == math.floor(left[i] * _q_cosine(i, S)), (i, left)
    # cosine reveals more positions at the first step than linear (q = sin(pi/2S) > 1/S): a different trace
    _, lin = _mask_trace(model, prompts=[[1]], gen_length=G, steps=S)
    assert left[1] < lin[0][0]
    # infill uses the same rule
    trace = []
    out = infill(model, [1] + [V] * G, steps=S, schedule="cosine",
                 callback=lambda step, seqs: trace.append(int((seqs[0] == V).sum())))
    assert out.steps == [S] and trace == left[1:]


def test_ancestral_reveal_probability_follows_the_schedule():
    model = ToyModel(lambda ids: torch.zeros(ids.shape[0], ids.shape[1], V))
    S, G, n_seeds = 5, 64, 40
    for name, q_of in (("cosine", _q_cosine), ("polynomial:2", lambda i, S: 1 - ((S - i - 1) / (S - i)) ** 2)):
        _, trace = _mask_trace(model, prompts=[[1]] * n_seeds, gen_length=G, steps=S, sampler="ancestral",
                               seed=list(range(n_seeds)), schedule=name)
        left = np.array([[G] * n_seeds] + trace, dtype=np.float64)  # (S + 1, rows)
        for i in range(S - 1):
            m, q = left[i].sum(), q_of(i, S)
            revealed = m - left[i + 1].sum()
            assert abs(revealed - m * q) <= 5 * math.sqrt(m * q * (1 - q)), (name, i, revealed, m * q)
        assert left[-1].sum() == 0
        # the first cosine step reveals sin(pi/(2S)) ~ 0.31 of the positions, linear 1/S = 0.2
        if name == "cosine":
            assert (G * n_seeds - left[1].sum()) / (G * n_seeds) > 0.25


def _reference_loop_schedule(model, prompt, G, S, sampler, q_of, seed=0):
    """Without blocks: the commit rule with the reveal fraction q_of(i, S) (the plain loop above, scheduled)."""
    seq = list(prompt) + [V] * G
    positions = list(range(len(prompt), len(prompt) + G))
    for i in range(S):
        cand = [j for j in positions if seq[j] == V]
        if not cand:
            break
        logits = _logits_of(model, seq)
        probs = torch.softmax(logits, -1)
        tok = {j: int(torch.argmax(logits[j])) for j in cand}
        conf = {j: float(probs[j, tok[j]]) for j in cand}
        ranked = sorted(cand, key=lambda j: (-conf[j], j))
        q = 1.0 if i == S - 1 else q_of(i, S)
        if sampler == "ancestral":
            commit = [j for j in cand if rng.uniform(rng.key(seed, i, j, sampling.REVEAL_STREAM)) < q]
        else:
            commit = ranked[:math.floor(len(cand) * q + 1e-9)]
        for j in commit:
            seq[j] = tok[j]
    return seq[len(prompt):]


@pytest.mark.parametrize("sampler", ["low_confidence", "ancestral"])
def test_scheduled_sampler_matches_plain_reference_loop(mdm, sampler):
    prompt, G, S = [3, 1, 4, 1, 5], 16, 6
    out = generate(mdm, [prompt], gen_length=G, steps=S, seed=3, sampler=sampler, schedule="cosine")
    assert out.tokens[0] == _reference_loop_schedule(mdm, prompt, G, S, sampler, _q_cosine, seed=3)


@pytest.mark.parametrize("kw", [dict(sampler="low_confidence", block_length=4, steps=8),
                                dict(sampler="threshold", threshold=0.05, block_length=8)],
                         ids=["blocks", "threshold"])
def test_block_quota_and_threshold_are_schedule_free(mdm, kw):
    a = generate(mdm, [[3, 1, 4]], gen_length=16, seed=1, temperature=1.0, **{"steps": 8, **kw})
    b = generate(mdm, [[3, 1, 4]], gen_length=16, seed=1, temperature=1.0, schedule="cosine",
                 **{"steps": 8, **kw})
    assert a.tokens == b.tokens and a.steps == b.steps


def test_bad_schedule_raises(mdm, arm):
    for fn, args in ((generate, ([[1, 2]],)), (infill, ([1, V, V],))):
        with pytest.raises(ValueError, match="unknown schedule 'cosinus'"):
            fn(mdm, *args, steps=2, schedule="cosinus")
    with pytest.raises(ValueError, match="unknown schedule 'polynomial:0'"):
        generate(arm, [[1]], gen_length=2, schedule="polynomial:0")


def test_infill_default_steps_are_one_per_position_in_every_block():
    """Without `steps`, infill commits one token per step in every block, also when the last block is short
    (steps split evenly over blocks of 16, 16 and 3 positions would commit two at a time in the long ones)."""
    model = ToyModel(lambda ids: torch.zeros(ids.shape[0], ids.shape[1], V))
    G = 35
    trace = []
    out = infill(model, [1] + [V] * G, block_length=16,
                 callback=lambda step, seqs: trace.append(int((seqs[0] == V).sum())))
    left = [G] + trace
    assert out.steps == [G] and [a - b for a, b in zip(left, left[1:])] == [1] * G


def test_inputs_in_the_forms_users_pass_them(mdm, arm):
    """Token ids as lists, numpy arrays, tensors or a tokenizers.Encoding; numpy integers for the counts
    (sweeps over np.arange); text, floats, bools and seed=None are errors naming the prompt or option."""

    class Encoding:  # what tokenizers' encode returns: ids in .ids
        ids = [1, 2, 3]

    kw = dict(gen_length=8, steps=8, temperature=1.0, seed=4)
    want = generate(mdm, [[1, 2, 3]], **kw).tokens
    for p in (np.array([1, 2, 3], dtype=np.int32), torch.tensor([1, 2, 3]), Encoding(), (1, 2, np.int64(3)),
              np.array([1, 2, 3], dtype=object), range(1, 4)):
        assert generate(mdm, [p], **kw).tokens == want, p
    empty = generate(mdm, [[]], **kw).tokens
    assert generate(mdm, [torch.tensor([])], **kw).tokens == generate(mdm, [np.array([])], **kw).tokens == empty
    assert generate(mdm, [[1, 2, 3]], gen_length=np.int64(8), steps=np.int64(8), temperature=1.0,
                    seed=4).tokens == want
    assert generate(mdm, [[1, 2, 3]], gen_length=8, steps=np.int32(4), block_length=np.int64(4), top_k=np.int64(5),
                    temperature=1.0).tokens == generate(mdm, [[1, 2, 3]], gen_length=8, steps=4, block_length=4,
                                                        top_k=5, temperature=1.0).tokens
    for bad, msg in ((["def "], r"prompt 0 is text \('def '\): pass token ids"),
                     ([[1, 2], [1.7, 2.2]], r"prompt 1 holds 1\.7: token ids are ints"),
                     ([[True, 2]], "prompt 0 holds True"),
                     ([np.array([1.0, 2.0])], "prompt 0 must be a 1-D integer array"),
                     ([b"\x01\x02"], "prompt 0 is text"), ([{1, 2}], "prompt 0 is a set, which has no order"),
                     ("hello", "prompts must be a list of token-id lists"),
                     (Encoding(), "prompts must be a list of token-id lists")):
        with pytest.raises(ValueError, match=msg):
            generate(mdm, bad, gen_length=4, steps=4)
    for seed in (None, [True]):
        with pytest.raises(ValueError, match="seed must be an int or a list of ints"):
            generate(mdm, [[1]], gen_length=4, steps=4, seed=seed)
    with pytest.raises(ValueError, match="gen_length must be an int >= 1, got 4.0"):
        generate(arm, [[1]], gen_length=4.0)
    m = mdm.config.mask_id
    with pytest.raises(ValueError, match="one list of positions per sequence"):
        infill(mdm, [[1, m, 2], [1, m, 3]], mask_positions=[1, 1])
    with pytest.raises(ValueError, match="sequence 1 is text"):
        infill(mdm, [[1, m, 2], "a b"])
    with pytest.raises(ValueError, match="one list of positions per sequence"):
        infill(mdm, [[1, 2, 3], [4, 5, 6]], mask_positions=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"mask_positions\[0\] holds 1\.7"):
        infill(mdm, [1, 2, 3], mask_positions=[1.7])

    class Holes:  # one tokenizers.Encoding: one sequence
        ids = [1, m, m, 2]

    one = infill(mdm, [1, m, m, 2], temperature=1.0).tokens
    assert infill(mdm, Holes(), temperature=1.0).tokens == one
    assert infill(mdm, [range(1, 4)], mask_positions=[[1]]).tokens[0][::2] == [1, 3]


def test_arm_callback_counts_steps_across_prompt_lengths(arm):
    """The ARM decodes each prompt length in turn; the callback's step still counts up once over the whole
    call (it restarted at 1 for each length), as the MDM's does."""
    steps = []
    generate(arm, [[1, 2], [1, 2, 3], [4, 5]], gen_length=3, callback=lambda s, seqs: steps.append(s))
    assert steps == list(range(1, 7))

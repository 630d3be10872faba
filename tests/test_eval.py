# python -m pytest -q tests/test_eval.py
"""`smdm eval` (smdm.evaluate): conditional scores of the MDM (Monte Carlo ELBO, chain rule, CFG) and the ARM
twin against their definitions, batch invariance, multiple-choice accuracy on models whose answers are known,
GSM8K answer extraction (on the real test file when present), perplexity on shards, the CLI and its errors."""

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from smdm import checkpoint, evaluate
from smdm.diffusion import elbo_exact, elbo_masks, elbo_nll, elbo_times, sum_stderr
from smdm.model import build_model, config_by_name

WORDS = ["<|endoftext|>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "fast", "[UNK]"]
V = len(WORDS)
GSM8K = Path("/work/shared/data/gsm8k")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _model(causal=False, seed=0, vocab=V, ctx=64):
    return build_model(config_by_name("tiny", vocab_size=vocab, causal=causal, max_seq_len=ctx), seed=seed).eval()


@pytest.fixture(scope="module")
def mdm():
    return _model(False, seed=1)


@pytest.fixture(scope="module")
def arm():
    return _model(True, seed=2)


def unigram_model(logits, causal):
    """A Transformer that predicts softmax(logits) at every position whatever its input: blocks add nothing
    (zero output projections), every embedding row is the same vector e, and the head maps norm(e) to
    `logits`. Its exact NLL of a continuation is sum_i -log q(x_i) for the ARM, for the MDM's chain rule in
    any order, and for the MDM's exact ELBO (each token's mask-set weights sum to 1)."""
    logits = torch.tensor(logits, dtype=torch.float32)
    m = _model(causal, seed=3, vocab=len(logits))
    with torch.no_grad():
        for b in m.blocks:
            b.attn.proj.weight.zero_()
            b.mlp.w3.weight.zero_()
        m.embed.weight.copy_(m.embed.weight[:1].expand_as(m.embed.weight))
        h = m.norm(m.embed.weight[:1])  # (1, d)
        m.head.weight.copy_(logits[:, None] * h / (h * h).sum())
    return m


def _tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    tok.save(str(path))
    return Tokenizer.from_file(str(path))


def _save(root, model, name):
    return checkpoint.save(root / name, 1, model_state=model.state_dict(),
                           config={"model": model.config.to_dict(), "objective": name},
                           train_state={"step": 1}, tokenizer_path=root / "tokenizer.json")


PAIRS = [([1, 2, 3], [4, 5, 6]), ([7], [1, 1]), ([2, 9, 9, 8, 1], [3]), ([], [5, 6, 7, 8]), ([4, 4], [2, 6, 1])]


# ---- scores against their definitions ------------------------------------------------------------------------

def test_elbo_is_diffusion_elbo_nll(mdm):
    """Same seed and row ids: the same times and masks as `diffusion.elbo_nll`, so the same estimate."""
    pairs = [([1, 2, 3], [4, 5, 6]), ([7, 8, 9], [1, 1, 2]), ([5, 5, 5], [9, 8, 7])]
    s = evaluate.score(mdm, pairs, n_samples=24, seed=5, row_ids=[10, 11, 12])
    x = torch.tensor([c + d for c, d in pairs])
    e = elbo_nll(mdm, x, prompt_lens=[3, 3, 3], n_samples=24, seed=5, row_ids=[10, 11, 12])
    np.testing.assert_allclose(s.nll, e.nll.numpy(), rtol=1e-5)
    np.testing.assert_allclose(s.stderr, e.stderr.numpy(), rtol=1e-5)
    assert s.n_tokens.tolist() == [3, 3, 3] and s.method == "elbo" and s.n_samples == 24


def test_count_estimator_is_diffusion_elbo_nll_and_converges(mdm):
    """estimator="count": the same masks and weights as `diffusion.elbo_nll`'s, ragged continuations included,
    and within a few standard errors of the enumerated ELBO; the constant matches diffusion's."""
    from smdm import diffusion

    assert evaluate.ELBO_ESTIMATORS == diffusion.ELBO_ESTIMATORS
    pairs = [([1, 2, 3], [4, 5, 6]), ([7, 8, 9], [1, 1, 2]), ([5, 5, 5], [9, 8, 7])]
    s = evaluate.score(mdm, pairs, n_samples=24, seed=5, row_ids=[10, 11, 12], estimator="count")
    x = torch.tensor([c + d for c, d in pairs])
    e = elbo_nll(mdm, x, prompt_lens=[3, 3, 3], n_samples=24, seed=5, row_ids=[10, 11, 12], estimator="count")
    np.testing.assert_allclose(s.nll, e.nll.numpy(), rtol=1e-5)
    np.testing.assert_allclose(s.stderr, e.stderr.numpy(), rtol=1e-5)
    assert s.estimator == "count" and e.estimator == "count"
    assert not np.allclose(s.nll, evaluate.score(mdm, pairs, n_samples=24, seed=5, row_ids=[10, 11, 12]).nll)
    pairs = [p for p in PAIRS if p[0]]
    s = evaluate.score(mdm, pairs, n_samples=256, seed=1, batch_invariant=False, estimator="count")
    for i, (c, d) in enumerate(pairs):
        exact = float(elbo_exact(mdm, torch.tensor([c + d]), [len(c)])[0])
        # (one token: every sample masks it alone, weight 1: exact up to the float32 model, stderr 0)
        assert abs(s.nll[i] - exact) < 4 * s.stderr[i] + 1e-6 * exact, (i, s.nll[i], exact, s.stderr[i])
        assert (s.stderr[i] == 0) == (len(d) == 1)
    assert evaluate.score(mdm, pairs, method="chain", estimator="count").estimator is None
    with pytest.raises(ValueError, match="estimator must be one of"):
        evaluate.score(mdm, pairs, estimator="Count")


def test_elbo_converges_to_exact(mdm):
    """The Monte Carlo ELBO is within a few standard errors of the enumerated ELBO."""
    pairs = [p for p in PAIRS if p[0]]  # elbo_exact takes equal-length rows one at a time
    s = evaluate.score(mdm, pairs, n_samples=256, seed=1, batch_invariant=False)
    for i, (c, d) in enumerate(pairs):
        exact = float(elbo_exact(mdm, torch.tensor([c + d]), [len(c)])[0])
        assert abs(s.nll[i] - exact) < 4 * s.stderr[i] + 1e-9, (i, s.nll[i], exact, s.stderr[i])
        assert s.stderr[i] < 0.2 * exact


def test_chain_rule_matches_hand_loop(mdm):
    """Left to right: reveal one continuation token per step, each predicted with the rest masked."""
    for order in ("l2r", "r2l"):
        s = evaluate.score(mdm, PAIRS, method="chain", order=order)
        for i, (c, d) in enumerate(PAIRS):
            x0 = torch.tensor(c + d)
            steps = range(len(d)) if order == "l2r" else reversed(range(len(d)))
            hidden = list(steps)
            total = 0.0
            for s_ in range(len(hidden)):
                x = x0.clone()
                x[[len(c) + j for j in hidden[s_:]]] = mdm.mask_id
                p = len(c) + hidden[s_]
                total -= float(torch.log_softmax(mdm(x[None])[0, p].double(), -1)[x0[p]])
            assert s.nll[i] == pytest.approx(total, rel=1e-5), (order, i)
        assert np.all(s.stderr == 0) and s.n_samples == 0


def test_chain_rule_averaged_over_orders_is_the_elbo(mdm):
    """The ELBO is the any-order autoregressive NLL averaged over all T! orders (mask-set weights
    (|M|-1)!(T-|M|)!/T!): the chain rule over every permutation averages to `elbo_exact`."""
    pairs = [([1, 2], [3, 4, 5]), ([6], [7, 8, 9])]
    for c, d in pairs:
        perms = list(itertools.permutations(range(len(d))))
        s = evaluate.score(mdm, [(c, d)] * len(perms), method="chain", order=perms)
        exact = float(elbo_exact(mdm, torch.tensor([c + d]), [len(c)])[0])
        assert s.nll.mean() == pytest.approx(exact, rel=1e-5)
        assert s.nll.std() > 1e-3  # the orders do differ


def test_arm_matches_log_softmax_loop(arm):
    s = evaluate.score(arm, [p for p in PAIRS if p[0]])
    for i, (c, d) in enumerate(p for p in PAIRS if p[0]):
        x = torch.tensor(c + d)
        logp = torch.log_softmax(arm(x[None])[0].double(), -1)  # (L, V)
        total = -sum(float(logp[j - 1, x[j]]) for j in range(len(c), len(x)))
        assert s.nll[i] == pytest.approx(total, rel=1e-5)
    assert s.method == "ar" and np.all(s.stderr == 0)


def test_cfg_zero_is_exactly_off_and_guided_matches_hand(mdm):
    base = evaluate.score(mdm, PAIRS, n_samples=8, batch_invariant=False)
    off = evaluate.score(mdm, PAIRS, n_samples=8, cfg=0.0, batch_invariant=False)
    assert np.array_equal(base.nll, off.nll) and np.array_equal(base.stderr, off.stderr)
    w = 1.5
    s = evaluate.score(mdm, PAIRS, method="chain", cfg=w)
    assert not np.allclose(s.nll, evaluate.score(mdm, PAIRS, method="chain").nll)
    for i, (c, d) in enumerate(PAIRS):  # guided chain rule by hand: u + (w+1)(c - u), prompt masked in u
        x0 = torch.tensor(c + d)
        total = 0.0
        for j in range(len(d)):
            x = x0.clone()
            x[len(c) + j:] = mdm.mask_id
            xu = x.clone()
            xu[:len(c)] = mdm.mask_id
            lc, lu = mdm(torch.stack([x, xu])).double()[:, len(c) + j]
            total -= float(torch.log_softmax(lu + (w + 1) * (lc - lu), -1)[x0[len(c) + j]])
        assert s.nll[i] == pytest.approx(total, rel=1e-5)


def test_guided_elbo_matches_hand(mdm):
    """CFG on the Monte Carlo ELBO: the same masks for c and u, CE under the guided logits, weight 1/t."""
    w, n, seed = 0.7, 6, 3
    c, d = [1, 2, 3], [4, 5, 6, 7]
    s = evaluate.score(mdm, [(c, d)], n_samples=n, seed=seed, cfg=w, row_ids=[42])
    t = elbo_times(n, seed)
    x0 = torch.tensor(c + d)
    target = torch.zeros(1, len(x0), dtype=torch.bool)
    target[0, len(c):] = True
    masks = elbo_masks(1, len(x0), n, 0, n, seed, [42], t, target)[:, 0]
    per = []
    for k in range(n):
        x = x0.masked_fill(masks[k], mdm.mask_id)
        xu = x.clone()
        xu[:len(c)] = mdm.mask_id
        lc, lu = mdm(torch.stack([x, xu])).double()
        logp = torch.log_softmax(lu + (w + 1) * (lc - lu), -1)
        per.append(-float(logp[masks[k], x0[masks[k]]].sum()) / t[k])
    assert s.nll[0] == pytest.approx(np.mean(per), rel=1e-5)
    assert s.stderr[0] == pytest.approx(np.std(per, ddof=1) / math.sqrt(n), rel=1e-5)


@pytest.mark.parametrize("method,cfg", [("elbo", 0.0), ("elbo", 1.0), ("chain", 0.5), ("ar", 0.0)])
def test_batch_size_and_order_do_not_change_scores(mdm, arm, method, cfg):
    """Bit-identical scores for batch sizes 1, 3, 64 and a shuffled order (default row ids: context hash)."""
    model = arm if method == "ar" else mdm
    pairs = [p for p in PAIRS if p[0]] if method == "ar" else PAIRS
    kw = dict(method=method, cfg=cfg, n_samples=4)
    ref = evaluate.score(model, pairs, batch_size=64, **kw)
    for bs in (1, 3):
        s = evaluate.score(model, pairs, batch_size=bs, **kw)
        assert np.array_equal(s.nll, ref.nll) and np.array_equal(s.stderr, ref.stderr), bs
    perm = [3, 0, 2, 1] + list(range(4, len(pairs)))
    s = evaluate.score(model, [pairs[i] for i in perm], batch_size=2, **kw)
    assert np.array_equal(s.nll, ref.nll[perm])
    alone = evaluate.score(model, pairs[1:2], batch_size=1, **kw)
    assert alone.nll[0] == ref.nll[1]


def test_unigram_model_all_methods_agree():
    """A model with known probabilities: ARM, MDM chain rule and exact ELBO all equal sum -log q."""
    logits = np.linspace(-1.0, 2.0, V)
    logq = logits - np.log(np.exp(logits).sum())
    mdm_u, arm_u = unigram_model(logits, False), unigram_model(logits, True)
    pairs = [p for p in PAIRS if p[0]]
    want = np.array([-logq[d].sum() for _, d in pairs])
    np.testing.assert_allclose(evaluate.score(arm_u, pairs).nll, want, rtol=1e-5)
    np.testing.assert_allclose(evaluate.score(mdm_u, pairs, method="chain").nll, want, rtol=1e-5)
    for (c, d), w in zip(pairs, want):
        assert float(elbo_exact(mdm_u, torch.tensor([c + d]), [len(c)])[0]) == pytest.approx(w, rel=1e-5)
    s = evaluate.score(mdm_u, pairs, n_samples=128, batch_invariant=False)
    assert np.all(np.abs(s.nll - want) < 4 * s.stderr)


def test_score_errors(mdm, arm):
    with pytest.raises(ValueError, match="continuation is empty"):
        evaluate.score(mdm, [([1], [])])
    with pytest.raises(ValueError, match="at least one context token"):
        evaluate.score(arm, [([], [1, 2])])
    with pytest.raises(ValueError, match="outside"):
        evaluate.score(mdm, [([1], [V])])  # the mask id is not a token
    with pytest.raises(ValueError, match="more than the model's context"):
        evaluate.score(mdm, [([1] * 60, [2] * 5)])
    with pytest.raises(ValueError, match="MDM only"):
        evaluate.score(arm, [([1], [2])], cfg=1.0)
    with pytest.raises(ValueError, match="does not apply"):
        evaluate.score(mdm, [([1], [2])], method="ar")
    with pytest.raises(ValueError, match="not a permutation"):
        evaluate.score(mdm, [([1], [2, 3])], method="chain", order=[[0, 0]])


# ---- any positions (score_positions: infilling likelihood) ----------------------------------------------------

# (ids, positions): a middle span, the first token, scattered positions listed out of order, a name-first layout
ITEMS = [([1, 2, 3, 4, 5, 6], [2, 3]), ([7, 1, 1, 2], [0]), ([2, 9, 9, 8, 1, 3], [4, 0, 1]),
         ([5, 6, 7, 8], [3, 1]), ([4, 4, 2, 6, 1], [0, 1, 3])]
ORDERS = [[1, 0], [0], [2, 0, 1], [0, 1], [1, 2, 0]]  # indices into each item's positions


def _reveal_order(pos, order, i):
    if order == "l2r":
        return sorted(pos)
    if order == "r2l":
        return sorted(pos, reverse=True)
    return [pos[j] for j in order[i]]


def _chain_by_hand(model, ids, reveal, w=0.0):
    """-log p and the greedy flag of revealing `reveal` one per step (the rest of it masked), each token
    predicted by the (guided) logits; the unconditional row masks every position not in `reveal`."""
    x0 = torch.tensor(ids)
    total, greedy = 0.0, True
    for s, p in enumerate(reveal):
        x = x0.clone()
        x[reveal[s:]] = model.mask_id
        logits = model(x[None])[0, p].double()
        if w:
            xu = torch.full_like(x0, model.mask_id)
            xu[reveal[:s]] = x0[reveal[:s]]
            lu = model(xu[None])[0, p].double()
            logits = lu + (w + 1) * (logits - lu)
        total -= float(torch.log_softmax(logits, -1)[x0[p]])
        greedy &= int(logits.argmax()) == int(x0[p])
    return total, greedy


def test_positions_chain_rule_matches_hand_loop(mdm):
    """The chain rule over any positions (middle, first, scattered), in l2r, r2l and a given order, with
    and without CFG, equals the definition computed with one model call per step."""
    for order, w in (("l2r", 0.0), ("r2l", 0.0), (ORDERS, 0.0), (ORDERS, 1.5)):
        s = evaluate.score_positions(mdm, ITEMS, method="chain", order=order, cfg=w)
        for i, (ids, pos) in enumerate(ITEMS):
            want, greedy = _chain_by_hand(mdm, ids, _reveal_order(pos, order, i), w)
            assert s.nll[i] == pytest.approx(want, rel=1e-5), (order, w, i)
            assert s.greedy[i] == greedy, (order, w, i)
        assert s.n_tokens.tolist() == [len(p) for _, p in ITEMS] and np.all(s.stderr == 0)
    l2r = evaluate.score_positions(mdm, ITEMS, method="chain").nll
    assert not np.allclose(l2r, evaluate.score_positions(mdm, ITEMS, method="chain", order=ORDERS).nll)


def test_positions_elbo_matches_hand(mdm):
    """Middle positions with CFG: the masks of `diffusion.elbo_masks` restricted to the targets, CE under
    u + (w+1)(c - u) with every non-target position masked in u, weight 1/t_k."""
    w, n, seed = 0.7, 6, 3
    ids, pos = [1, 2, 3, 4, 5, 6, 7], [1, 3, 4]
    s = evaluate.score_positions(mdm, [(ids, pos)], n_samples=n, seed=seed, cfg=w, row_ids=[42])
    t = elbo_times(n, seed)
    x0 = torch.tensor(ids)
    target = torch.zeros(1, len(ids), dtype=torch.bool)
    target[0, pos] = True
    masks = elbo_masks(1, len(ids), n, 0, n, seed, [42], t, target)[:, 0]
    assert masks.any() and not masks[:, [0, 2, 5, 6]].any()
    per = []
    for k in range(n):
        x = x0.masked_fill(masks[k], mdm.mask_id)
        xu = x.masked_fill(~target[0], mdm.mask_id)
        lc, lu = mdm(torch.stack([x, xu])).double()
        logp = torch.log_softmax(lu + (w + 1) * (lc - lu), -1)
        per.append(-float(logp[masks[k], x0[masks[k]]].sum()) / t[k])
    assert s.nll[0] == pytest.approx(np.mean(per), rel=1e-5)
    assert s.stderr[0] == pytest.approx(np.std(per, ddof=1) / math.sqrt(n), rel=1e-5)


def _elbo_enumerated(model, ids, pos):
    """The exact ELBO of x[pos] given the rest: every nonempty mask set M of the targets with weight
    (|M|-1)!(T-|M|)!/T! (the integral over t of `diffusion.elbo_exact`), for positions anywhere."""
    x0 = torch.tensor(ids)
    T, total = len(pos), 0.0
    for m in range(1, 2 ** T):
        M = [p for j, p in enumerate(pos) if m >> j & 1]
        x = x0.clone()
        x[M] = model.mask_id
        logp = torch.log_softmax(model(x[None])[0].double(), -1)
        ce = -float(logp[M, x0[M]].sum())
        total += ce * math.factorial(len(M) - 1) * math.factorial(T - len(M)) / math.factorial(T)
    return total


def test_positions_elbo_converges_to_exact_and_to_the_order_average(mdm):
    """For middle / scattered positions: the chain rule averaged over all T! orders equals the enumerated
    ELBO, and the Monte Carlo ELBO is within 4 standard errors of it (and far from the ELBO of the whole row,
    which masks drawn over every position would estimate: the check can tell them apart)."""
    items = [([1, 2, 3, 4, 5, 6], [1, 2, 3]), ([9, 8, 7, 6, 5], [0, 4]), ([3, 1, 4, 1, 5, 9, 2], [5, 0, 3])]
    s = evaluate.score_positions(mdm, items, n_samples=256, seed=1, batch_invariant=False)
    for i, (ids, pos) in enumerate(items):
        exact = _elbo_enumerated(mdm, ids, pos)
        perms = [list(o) for o in itertools.permutations(range(len(pos)))]
        chain = evaluate.score_positions(mdm, [(ids, pos)] * len(perms), method="chain", order=perms)
        assert chain.nll.mean() == pytest.approx(exact, rel=1e-5), i
        assert abs(s.nll[i] - exact) < 4 * s.stderr[i], (i, s.nll[i], exact, s.stderr[i])
        assert s.stderr[i] < 0.2 * exact
        unrestricted = _elbo_enumerated(mdm, ids, list(range(len(ids))))  # masks not kept to the targets
        assert abs(s.nll[i] - unrestricted) > 4 * s.stderr[i], (i, unrestricted)


@pytest.mark.parametrize("method,cfg", [("elbo", 0.0), ("elbo", 1.0), ("chain", 0.0), ("chain", 0.5),
                                        ("ar", 0.0)])
def test_positions_of_a_suffix_equal_score(mdm, arm, method, cfg):
    """A suffix through score_positions is `score` of (prefix, suffix) bit for bit (the ARM too), whatever
    order the suffix positions are listed in (chain: the order argument indexes the list as given)."""
    model = arm if method == "ar" else mdm
    pairs = [p for p in PAIRS if p[0]] if method == "ar" else PAIRS
    items = [(c + d, list(range(len(c), len(c) + len(d)))) for c, d in pairs]
    kw = dict(method=method, cfg=cfg, n_samples=8, batch_size=5)
    want = evaluate.score(model, pairs, **kw)
    got = evaluate.score_positions(model, items, **kw)
    assert np.array_equal(got.nll, want.nll) and np.array_equal(got.stderr, want.stderr)
    assert np.array_equal(got.n_tokens, want.n_tokens) and got.method == want.method
    assert (got.greedy is None) == (want.greedy is None)
    if want.greedy is not None:
        assert np.array_equal(got.greedy, want.greedy)
    backwards = [(ids, pos[::-1]) for ids, pos in items]
    if method == "chain":  # listed backwards, revealed in the same order
        orders = [list(range(len(p)))[::-1] for _, p in items]
        got = evaluate.score_positions(model, backwards, order=orders, **kw)
    else:
        got = evaluate.score_positions(model, backwards, **kw)
    assert np.array_equal(got.nll, want.nll)


@pytest.mark.parametrize("method,cfg", [("elbo", 0.0), ("elbo", 1.0), ("chain", 0.5)])
def test_positions_batch_size_and_order_do_not_change_scores(mdm, method, cfg):
    kw = dict(method=method, cfg=cfg, n_samples=4)
    ref = evaluate.score_positions(mdm, ITEMS, batch_size=64, **kw)
    for bs in (1, 3):
        s = evaluate.score_positions(mdm, ITEMS, batch_size=bs, **kw)
        assert np.array_equal(s.nll, ref.nll) and np.array_equal(s.stderr, ref.stderr), bs
    perm = [3, 0, 4, 2, 1]
    s = evaluate.score_positions(mdm, [ITEMS[i] for i in perm], batch_size=2, **kw)
    assert np.array_equal(s.nll, ref.nll[perm]) and np.array_equal(s.stderr, ref.stderr[perm])
    alone = evaluate.score_positions(mdm, ITEMS[2:3], batch_size=1, **kw)
    assert alone.nll[0] == ref.nll[2]


@pytest.mark.parametrize("method,cfg", [("elbo", 0.0), ("elbo", 1.0), ("chain", 0.0), ("chain", 0.5)])
def test_shared_rows_run_once_with_the_numbers_of_each_item_alone(mdm, monkeypatch, method, cfg):
    """Candidates of one context share every row whose differing positions are all masked: each distinct row
    runs once (counted at the model), across windows too, and every score and greedy flag is bit for bit the
    one the item gets alone."""
    rng = np.random.default_rng(0)
    context = [3, 9, 4, 4, 7]
    items = [([int(a), int(b)] + context, [0, 1]) for a, b in rng.integers(1, 4, (12, 2))]
    items += [(context[:3] + [int(a), 2], [3]) for a in rng.integers(1, 5, 6)]  # a shorter length, a suffix
    items += [items[0], items[-1]]  # exact duplicates
    kw = dict(method=method, cfg=cfg, n_samples=6)
    alone = [evaluate.score_positions(mdm, [it], batch_size=1, **kw) for it in items]
    rows_run, log_probs = [], evaluate._log_probs

    def counted(model, batch, *a):
        rows_run.append(len(batch))
        return log_probs(model, batch, *a)

    monkeypatch.setattr(evaluate, "_log_probs", counted)
    for window in (evaluate.WINDOW_TOKENS, 40):  # all units in one window; a few units per window
        monkeypatch.setattr(evaluate, "WINDOW_TOKENS", window)
        rows_run.clear()
        got = evaluate.score_positions(mdm, items, batch_size=4, **kw)
        assert np.array_equal(got.nll, [a.nll[0] for a in alone])
        assert np.array_equal(got.stderr, [a.stderr[0] for a in alone])
        if method == "chain":
            assert got.greedy.tolist() == [bool(a.greedy[0]) for a in alone]
        units = len(items) * kw["n_samples"] if method == "elbo" else sum(len(p) for _, p in items)
        assert sum(rows_run) < units, window  # (chain: the candidates' first steps, all targets masked, are one row)


@pytest.mark.parametrize("item,msg", [
    (([1, 2, 3], [1, 3]), "item 1: position 3 is out of range for a sequence of 3 tokens"),
    (([1, 2, 3], [-1]), "item 1: position -1 is out of range"),
    (([1, 2, 3], [0, 2, 0]), "item 1: position 0 is listed twice"),
    (([1, 2, 3], []), "item 1: no positions"),
    (([1, 2], 5), "item 1 is not an (ids, positions) pair"),
    (([1, V], [0]), "item 1 holds token id 11 outside"),
    (([1] * 65, [3]), "item 1 has 65 tokens, more than the model's context of 64"),
])
def test_positions_errors_name_the_item(mdm, item, msg):
    with pytest.raises(ValueError) as e:
        evaluate.score_positions(mdm, [([1, 2], [1]), item])
    assert msg in str(e.value)


def test_positions_arm_scores_suffixes_only(mdm, arm):
    for pos in ([0, 2], [1], [0, 1, 2]):  # the middle, the start, everything (no given token)
        with pytest.raises(ValueError, match=r"item 1: the ARM twin scores only a suffix"):
            evaluate.score_positions(arm, [([1, 2, 3], [2]), ([1, 2, 3], pos)])
    with pytest.raises(ValueError, match="does not apply"):
        evaluate.score_positions(arm, [([1, 2, 3], [2])], method="chain")
    with pytest.raises(ValueError, match=r"order\[0\] = \[0, 0\] is not a permutation"):
        evaluate.score_positions(mdm, [([1, 2, 3], [0, 2])], method="chain", order=[[0, 0]])
    with pytest.raises(ValueError, match="order has 2 permutations for 1 items"):
        evaluate.score_positions(mdm, [([1, 2, 3], [0, 2])], method="chain", order=[[0, 1], [1, 0]])


# ---- multiple choice ------------------------------------------------------------------------------------------

# unigram logits of the constructed models (the rest 0): "cat" likely, "mat" less, "dog" and "fast" unlikely
PREFS = {"cat": 3.0, "mat": 1.0, "dog": -2.0, "fast": -2.0}
MC_ITEMS = [
    {"context": "the", "choices": [" cat", " dog"], "label": 0},
    {"context": "a dog ran ", "choices": ["fast", "cat"], "label": 1},  # trailing space moves to the choice
    {"context": "", "choices": [" dog sat", " cat sat", " mat"], "label": 1},  # empty context: [EOS]
    # total NLL prefers " dog" (one unlikely token); per character the long, likely choice wins
    {"context": "the", "choices": [" mat mat mat mat mat", " dog"], "label": 0},
]
# argmin of the exact NLL (sum of -log q), of NLL per character and per token, per item
WANT = {"pred": [0, 1, 2, 1], "pred_norm": [0, 1, 1, 0], "pred_token": [0, 1, 1, 0]}


@pytest.fixture(scope="module")
def mc_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tok = _tokenizer(root / "tokenizer.json")
    logits = [PREFS.get(w, 0.0) for w in WORDS]
    ckpts = {"mdm": _save(root, unigram_model(logits, False), "mdm"),
             "arm": _save(root, unigram_model(logits, True), "arm")}
    data = root / "mc.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in MC_ITEMS))
    return root, tok, ckpts, data, logits


def test_encode_pair_like_lm_eval(mc_setup):
    tok = mc_setup[1]
    assert evaluate.encode_pair(tok, "a dog ran ", "fast") == ([6, 7, 8], [9])
    assert evaluate.encode_pair(tok, "the", " cat sat") == ([1], [2, 3])


def test_mc_accuracy_on_known_model(mc_setup):
    _, tok, ckpts, data, logits = mc_setup
    items = evaluate.read_mc(data)
    logq = np.array(logits) - np.log(np.exp(logits).sum())
    for name, kw in (("arm", {}), ("mdm", {"method": "chain"}), ("mdm", {"n_samples": 128})):
        model, _ = checkpoint.load(ckpts[name], device="cpu")
        res = evaluate.evaluate_mc(model, tok, items, eos_id=0, batch_invariant=False, **kw)
        recs = res["records"]
        assert recs[3]["n_tokens"] == [5, 1] and recs[3]["n_chars"] == [20, 4]
        if kw.get("n_samples"):  # Monte Carlo: nll within 4 stderr of the exact value
            exact = [-logq[evaluate.encode_pair(tok, it.context, c)[1]].sum()
                     for it in items for c in it.choices]
            got = [(n, e) for r in recs for n, e in zip(r["nll"], r["stderr"])]
            assert all(abs(n - x) < 4 * e for (n, e), x in zip(got, exact)), (got, exact)
            assert recs[0]["pred"] == 0  # one-token choices at one position share their masks exactly
            continue
        for key, want in WANT.items():
            assert [r[key] for r in recs] == want, (name, kw, key)
        assert res["acc"] == 0.5 and res["acc_norm"] == 1.0 and res["acc_token"] == 1.0
        assert {"acc_bytes", "acc_bytes_stderr"} <= res.keys()  # lm-eval 0.4's metric names
        assert res["acc_stderr"] == pytest.approx(math.sqrt(0.5 * 0.5 / 3))


def test_mc_acc_bytes_divides_by_utf8_bytes(mc_setup):
    """acc_bytes normalises by the choice's UTF-8 bytes, acc_norm by its characters: they part on non-ASCII text.
    " " + 12 x "日" is one (unknown-word) token of NLL 3.40 in 13 characters and 37 bytes; " cat" is 0.40 in 4
    of each. Per character " cat" wins (0.101 < 0.262), per byte the long choice does (0.092 < 0.101)."""
    _, tok, ckpts, _, _ = mc_setup
    model, _ = checkpoint.load(ckpts["arm"], device="cpu")
    items = [evaluate.McItem(context="the", choices=[" " + "日" * 12, " cat"], label=0, line=1)]
    res = evaluate.evaluate_mc(model, tok, items, eos_id=0)
    r = res["records"][0]
    assert r["n_chars"] == [13, 4] and r["n_bytes"] == [37, 4] and r["n_tokens"] == [1, 1]
    assert (r["pred_norm"], r["pred_byte"]) == (1, 0), r
    assert (res["acc_norm"], res["acc_bytes"]) == (0.0, 1.0)


def test_mc_cli_two_models_json(mc_setup, capsys):
    root, _, ckpts, data, _ = mc_setup
    out = root / "res.json"
    rc = evaluate.main(["mc", "--ckpt", str(ckpts["mdm"]), "--ckpt", str(ckpts["arm"]), "--data", str(data),
                        "--n-samples", "16", "--batch-size", "5", "--device", "cpu", "--json", str(out)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "(MDM): [elbo n=16]" in cap.out and "(ARM): [ar]" in cap.out
    doc = json.loads(out.read_text())
    assert [r["model"] for r in doc["results"]] == ["MDM", "ARM"]
    assert doc["results"][1]["acc"] == 0.5 and doc["results"][1]["acc_norm"] == 1.0
    assert len(doc["results"][0]["records"]) == 4
    assert not list(root.glob(".res.json.tmp*"))  # written atomically (temporary name renamed)
    rc = evaluate.main(["mc", "--ckpt", str(ckpts["mdm"]), "--data", str(data), "--limit", "2", "--method",
                        "chain", "--cfg", "0.5", "--device", "cpu"])
    cap = capsys.readouterr()
    assert rc == 0 and "[chain cfg=0.5] n=2" in cap.out and "note" not in cap.err
    # the ARM twin does not use them: a note names them (before: silence), the MDM's run is the same
    rc = evaluate.main(["mc", "--ckpt", str(ckpts["mdm"]), "--ckpt", str(ckpts["arm"]), "--data", str(data),
                        "--limit", "2", "--method", "chain", "--cfg", "0.5", "--device", "cpu"])
    cap = capsys.readouterr()
    assert rc == 0 and "[chain cfg=0.5] n=2" in cap.out
    assert f"{ckpts['arm']} is an autoregressive model" in cap.err and "--method chain, --cfg 0.5 apply to the " \
        "MDM only" in cap.err, cap.err
    assert cap.err.count("note") == 1


def test_registered_in_smdm_cli(mc_setup, monkeypatch, capsys):
    """The line the `smdm` CLI gets: COMMANDS["eval"] = ("smdm.evaluate", ...)."""
    from smdm import cli

    _, _, ckpts, data, _ = mc_setup
    monkeypatch.setitem(cli.COMMANDS, "eval", ("smdm.evaluate", "likelihood and GSM8K benchmarks, MDM vs ARM"))
    rc = cli.main(["eval", "mc", "--ckpt", str(ckpts["arm"]), "--data", str(data), "--device", "cpu"])
    assert rc == 0 and "acc 0.5000 ± 0.2887" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["eval"])  # a task is required
    assert "mc" in capsys.readouterr().err


@pytest.mark.parametrize("line,msg", [
    ('{"context": "a", "choices": [" b", " c"]}', ":2: missing field 'label'"),
    ('{"context": 3, "choices": [" b", " c"], "label": 0}', ":2: field 'context' must be a string"),
    ('{"context": "a", "choices": " b", "label": 0}', ":2: field 'choices' must be a list"),
    ('{"context": "a", "choices": [" b"], "label": 0}', ":2: field 'choices' must be a list of at least 2"),
    ('{"context": "a", "choices": [" b", 7], "label": 0}', ":2: field 'choices'[1] must be a non-empty"),
    ('{"context": "a", "choices": [" b", " c"], "label": 2}', ":2: field 'label' = 2 is outside [0, 2)"),
    ('{"context": "a", "choices": [" b", " c"], "label": true}', ":2: field 'label' must be an integer"),
    ('{"context": "a", "choices": [" b", " c"], "label": 0', ":2: not valid JSON"),
    ('[1, 2]', ":2: expected a JSON object"),
])
def test_bad_mc_jsonl(tmp_path, line, msg):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(MC_ITEMS[0]) + "\n" + line + "\n")
    with pytest.raises(evaluate.EvalDataError) as e:
        evaluate.read_mc(p)
    assert str(p) in str(e.value) and msg in str(e.value)


def test_cli_errors(mc_setup, tmp_path, capsys):
    _, _, ckpts, data, _ = mc_setup
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    for argv, msg in [(["--data", str(empty)], "no questions"),
                      (["--data", str(tmp_path / "missing.jsonl")], "no such file"),
                      (["--data", str(data), "--n-samples", "1"], "--n-samples must be >= 2"),
                      (["--data", str(data), "--cfg", "-1"], "--cfg must be finite and >= 0"),
                      (["--data", str(data), "--method", "ar"], "--method must be elbo or chain"),
                      (["--data", str(data), "--method", "chain", "--estimator", "count"], "--method chain is exact"),
                      # n-samples is the ELBO's too: it was silently ignored by the chain rule
                      (["--data", str(data), "--method", "chain", "--n-samples", "8"],
                       "--n-samples 8 is the ELBO's (--method elbo); --method chain is exact")]:
        rc = evaluate.main(["mc", "--ckpt", str(ckpts["mdm"]), "--device", "cpu", *argv])
        assert rc == 2 and msg in capsys.readouterr().err, msg



def test_json_path_errors_are_clear_and_come_before_the_evaluation(mc_setup, tmp_path, capsys, monkeypatch):
    """--json in a missing directory is said before any model runs; a --json that cannot be written (a directory)
    is an error naming it, not a traceback after the evaluation."""
    _, _, ckpts, data, _ = mc_setup
    ran = []
    monkeypatch.setattr(evaluate, "_run_one", lambda args, ckpt: ran.append(ckpt))
    rc = evaluate.main(["mc", "--ckpt", str(ckpts["arm"]), "--data", str(data), "--device", "cpu",
                        "--json", str(tmp_path / "missing" / "res.json")])
    assert rc == 2 and "--json" in capsys.readouterr().err and ran == []
    monkeypatch.undo()
    rc = evaluate.main(["mc", "--ckpt", str(ckpts["arm"]), "--data", str(data), "--device", "cpu",
                        "--json", str(tmp_path)])
    err = capsys.readouterr().err  # said before the evaluation too (json_out), not after it
    assert rc == 2 and f"--json {tmp_path}: is a directory" in err, err


def test_mc_context_longer_than_the_model_names_the_line(mc_setup, tmp_path, capsys):
    """A question that does not fit the model's context is an error naming its line and choice (not the index
    of a flattened (context, choice) pair, which the user cannot map back to the file)."""
    _, tok, ckpts, _, _ = mc_setup
    data = tmp_path / "long.jsonl"
    long = {"context": " ".join(["the cat sat"] * 30), "choices": [" mat", " dog"], "label": 0}  # 90 tokens
    data.write_text(json.dumps(MC_ITEMS[0]) + "\n" + json.dumps(long) + "\n")
    for name in ("mdm", "arm"):  # both have a context of 64 tokens
        model, _ = checkpoint.load(ckpts[name], device="cpu")
        with pytest.raises(ValueError, match=r"long.jsonl:2: context \+ choice 0 has 91 tokens, more than the "
                                             r"model's context of 64"):
            evaluate.evaluate_mc(model, tok, evaluate.read_mc(data), eos_id=0, n_samples=4)
        rc = evaluate.main(["mc", "--ckpt", str(ckpts[name]), "--data", str(data), "--device", "cpu"])
        # FILE:LINE like every other data error (it was "line 2: ...", no file)
        assert rc == 2 and f"error: {data}:2: context + choice 0" in capsys.readouterr().err

# ---- GSM8K ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,want", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("#### 1,000", "1000"),
    ("so the answer is #### $1,234.50.", "1234.5"),
    ("The total is 5 apples and 7 pears, so 12.", "12"),
    ("It drops by -3 degrees", "-3"),
    ("#### 18.00", "18"),
    ("first #### 5 then #### 6", "6"),
    ("costs $0.25 each", "0.25"),
    ("The numbers 3, 4 and 5", "5"),
    ("no number here", None),
    ("####", None),
    ("#### -0", "0"),
    ("1e3 is not how GSM8K writes 1000", "1000"),
    # a weak model repeating a digit token: past Python's 4300-digit int limit (it aborted the whole eval)
    ("The answer is " + "12" * 2600, "12" * 2600),
    ("#### " + "7" * 5000, "7" * 5000),
])
def test_extract_answer(text, want):
    assert evaluate.extract_answer(text) == want


def test_jsonl_lines_end_at_newline_only(tmp_path):
    """U+2028, U+2029 and U+0085 are legal unescaped inside JSON strings; `str.splitlines` cut a line there, so
    `smdm eval` refused files the SFT reader took (GSM8K written with ensure_ascii=False has a U+2028)."""
    rows = [{"question": "a\u2028b\u2029c\x85d\x0ce?", "answer": "x\n#### 3"}, {"question": "q", "answer": "#### 4"}]
    p = tmp_path / "g.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    items = evaluate.read_gsm8k(p)
    assert [(it.line, it.question, it.gold) for it in items] == [(1, rows[0]["question"], "3"), (2, "q", "4")]
    from smdm import sft

    assert [no for no, _, _ in sft.read_pairs(p, "gsm8k")] == [1, 2]  # both readers: one definition
    p.write_bytes(p.read_bytes() + b'{"question": "caf\xe9", "answer": "#### 1"}\n')
    with pytest.raises(evaluate.EvalDataError, match=r"g\.jsonl:3: not UTF-8 text"):
        evaluate.read_gsm8k(p)


@pytest.mark.skipif(not (GSM8K / "test.jsonl").is_file(), reason="GSM8K data not present")
def test_every_gsm8k_reference_parses():
    items = evaluate.read_gsm8k(GSM8K / "test.jsonl")
    assert len(items) == 1319
    for it in items:
        raw = it.answer.rsplit("####", 1)[1].strip()
        assert it.gold == raw.replace(",", ""), it.line  # all references are integers, some with commas
        assert evaluate.extract_answer(it.answer) == it.gold  # the flexible path agrees on references
    assert evaluate.read_gsm8k(GSM8K / "test.jsonl", limit=3)[0].gold == "18"


def test_gsm8k_prompt_and_pipeline(tmp_path, monkeypatch, mc_setup):
    """Prompt layout, cutting at the next question, extraction and scoring, with a scripted generator."""
    tok = mc_setup[1]
    shots = [evaluate.Gsm8kItem("q1?", "2+2=<<2+2=4>>4\n#### 4", "4", 1)]
    assert evaluate.gsm8k_prompt("q2?", shots) == "Question: q1?\nAnswer: 2+2=4\n#### 4\n\nQuestion: q2?\nAnswer:"
    items = [evaluate.Gsm8kItem("the cat", "#### 7", "7", 1), evaluate.Gsm8kItem("a dog", "#### 3", "3", 2)]
    from smdm import sampling

    texts = {1: "the cat sat 7 Question: 3", 2: "dog ran 5"}  # scripted generations, one token each

    class Tok:  # the word-level tokenizer for prompts; decodes the scripted generations
        def encode(self, s, add_special_tokens=False):
            return tok.encode(s)

        def decode(self, ids, skip_special_tokens=True):
            return texts[ids[0]]

    def fake_generate(model, prompts, **kw):
        assert len(prompts) == 2 and kw["gen_length"] == 16 and kw["temperature"] == 0.0
        return sampling.GenerationOutput(tokens=[[1], [2]], sequences=[], forward_passes=3,
                                         row_forward_passes=[], steps=[], generated_tokens=9)

    monkeypatch.setattr(sampling, "generate", fake_generate)
    res = evaluate.evaluate_gsm8k(_model(False), Tok(), items, gen_length=16, batch_size=8)
    assert [r["pred"] for r in res["records"]] == ["7", "5"]
    assert [r["correct"] for r in res["records"]] == [True, False]
    assert res["records"][0]["generation"] == "the cat sat 7"
    assert res["acc"] == 0.5 and res["generated_tokens"] == 9 and res["forward_passes"] == 3


def test_gsm8k_cli_runs(prepared, tmp_path, capsys):
    """End to end on tiny random models with a BPE tokenizer: both kinds run, records are complete."""
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(prepared / "tokenizer.json")).get_vocab_size()
    (tmp_path / "tokenizer.json").write_bytes((prepared / "tokenizer.json").read_bytes())
    mdm_ck = _save(tmp_path, _model(False, vocab=vocab, ctx=256), "mdm")
    arm_ck = _save(tmp_path, _model(True, vocab=vocab, ctx=256), "arm")
    rows = [{"question": f"def f{i}(x): return x", "answer": f"x\n#### {i}"} for i in range(3)]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:1]))
    out = tmp_path / "g.json"
    rc = evaluate.main(["gsm8k", "--ckpt", str(mdm_ck), "--ckpt", str(arm_ck), "--data",
                        str(tmp_path / "test.jsonl"), "--few-shot", "1", "--gen-length", "8", "--steps", "4",
                        "--batch-size", "2", "--device", "cpu", "--json", str(out)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    doc = json.loads(out.read_text())
    for res in doc["results"]:
        assert res["n"] == 3 and len(res["records"]) == 3 and 0 <= res["acc"] <= 1 and res["few_shot"] == 1
    assert doc["results"][0]["forward_passes"] == 2 * 4  # two batches of 4 steps
    rc = evaluate.main(["gsm8k", "--ckpt", str(mdm_ck), "--data", str(tmp_path / "test.jsonl"), "--few-shot",
                        "5", "--device", "cpu"])
    assert rc == 2 and "holds 1 examples" in capsys.readouterr().err
    (tmp_path / "train.jsonl").unlink()  # the default worked examples missing: the message names --train
    rc = evaluate.main(["gsm8k", "--ckpt", str(mdm_ck), "--data", str(tmp_path / "test.jsonl"), "--few-shot", "1"])
    assert rc == 2 and "train.jsonl (beside --data): no such file; give --train FILE" in capsys.readouterr().err


def test_gsm8k_cli_samples_with_the_checkpoints_schedule_and_takes_threshold(prepared, tmp_path, capsys):
    """`smdm eval gsm8k` sampled with the linear schedule whatever the checkpoint was trained with, while
    `smdm generate` takes the checkpoint's (the same prompt gave different text), and `--sampler threshold`
    could not run (no --threshold option)."""
    import smdm
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(prepared / "tokenizer.json")).get_vocab_size()
    (tmp_path / "tokenizer.json").write_bytes((prepared / "tokenizer.json").read_bytes())
    m = _model(False, vocab=vocab, ctx=256)
    ck = checkpoint.save(tmp_path / "mdm", 1, model_state=m.state_dict(), train_state={"step": 1},
                         config={"model": m.config.to_dict(), "objective": "mdm", "train": {"schedule": "cosine"}},
                         tokenizer_path=tmp_path / "tokenizer.json")
    rows = [{"question": f"def f{i}(x): return x", "answer": f"x\n#### {i}"} for i in range(3)]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, tok = smdm.load(ck)
    items = evaluate.read_gsm8k(data)

    def cli(*extra):
        out = tmp_path / "g.json"
        rc = evaluate.main(["gsm8k", "--ckpt", str(ck), "--data", str(data), "--gen-length", "8", "--steps", "4",
                            "--device", "cpu", "--json", str(out), *extra])
        err = capsys.readouterr().err
        assert rc == 0, err
        return json.loads(out.read_text())["results"][0], err

    for extra, kw in (((), dict(schedule="cosine")), (("--schedule", "linear"), dict(schedule="linear")),
                      (("--sampler", "threshold", "--threshold", "0.3"), dict(schedule="cosine", sampler="threshold",
                                                                          threshold=0.3))):
        res, err = cli(*extra)
        want = evaluate.evaluate_gsm8k(model, tok, items, gen_length=8, steps=4, eos_id=evaluate.eos_id_of(tok), **kw)
        assert res["schedule"] == kw["schedule"] and res["threshold"] == kw.get("threshold")
        assert [r["generation"] for r in res["records"]] == [r["generation"] for r in want["records"]]
        # the threshold sampler's step count is adaptive: --steps is unused, said in a note, and not recorded
        # as the steps run (it recorded "steps": 4); what ran is in mean_steps and forward_passes
        threshold = kw.get("sampler") == "threshold"
        assert res["steps"] == (None if threshold else 4) and res["mean_steps"] == want["mean_steps"]
        assert ("--steps 4 is unused by --sampler threshold" in err) == threshold, err
        assert threshold or res["mean_steps"] == 4
    for extra, msg in ((("--sampler", "threshold"), "--threshold is required by --sampler threshold"),
                       (("--schedule", "nope"), "--schedule: "),
                       (("--sampler", "nope"), "--sampler must be one of")):
        assert evaluate.main(["gsm8k", "--ckpt", str(ck), "--data", str(data), *extra]) == 2
        assert msg in capsys.readouterr().err


def test_gsm8k_prompt_longer_than_the_model_names_the_line(mc_setup):
    """A prompt that does not fit the context with the generation is an error naming its line, not the index
    of the prompt inside its generation batch (here 0 of the second batch)."""
    tok = mc_setup[1]
    items = [evaluate.Gsm8kItem("the cat", "#### 7", "7", 1), evaluate.Gsm8kItem("the cat " * 30, "#### 3", "3", 2)]
    for causal in (False, True):
        with pytest.raises(ValueError, match=r"line 2: the prompt \(0-shot\) has 62 tokens; with gen_length=4 "
                                             r"that is 66 > the model's context of 64"):
            evaluate.evaluate_gsm8k(_model(causal), tok, items, gen_length=4, steps=4, batch_size=1)


def test_gsm8k_prompt_too_long_names_file_and_line(mc_setup, tmp_path, capsys):
    """Read from a file, the error says FILE:LINE like every other data error (it said "line 2: ..." only)."""
    _, _, ckpts, _, _ = mc_setup
    data = tmp_path / "g.jsonl"
    rows = [{"question": "the cat", "answer": "#### 7"}, {"question": "the cat " * 30, "answer": "#### 3"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = evaluate.main(["gsm8k", "--ckpt", str(ckpts["arm"]), "--data", str(data), "--gen-length", "4",
                        "--device", "cpu"])
    assert rc == 2 and f"error: {data}:2: the prompt (0-shot) has 62 tokens" in capsys.readouterr().err

def test_bad_gsm8k_jsonl(tmp_path):
    p = tmp_path / "g.jsonl"
    p.write_text('{"question": "q", "answer": "no final number"}\n')
    with pytest.raises(evaluate.EvalDataError, match=r"g.jsonl:1: field 'answer' has no final"):
        evaluate.read_gsm8k(p)


# ---- perplexity -----------------------------------------------------------------------------------------------

def test_ppl_same_windows(prepared, tmp_path, capsys):
    """The ARM's NLL per token equals a plain CE over the reader's windows; the MDM's equals elbo_nll on
    them; the CLI prints both."""
    from smdm.data import PackedDataset
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(prepared / "tokenizer.json")).get_vocab_size()
    mdm_m, arm_m = _model(False, vocab=vocab), _model(True, vocab=vocab)
    L = 24
    r_arm = evaluate.evaluate_ppl(arm_m, prepared, seq_len=L, limit=5, batch_size=2)
    r_mdm = evaluate.evaluate_ppl(mdm_m, prepared, seq_len=L, limit=5, batch_size=2, n_samples=8)
    ds = PackedDataset(prepared, L, 5, extra_token=True, shuffle=False, epochs=1, split="val")
    b = next(iter(ds))
    x, seg = b["input_ids"], b["segment_ids"]
    with torch.no_grad():
        logits = arm_m(x[:, :-1], segment_ids=seg[:, :-1])
    want = float(F.cross_entropy(logits.transpose(1, 2), x[:, 1:]))
    assert r_arm["windows"] == 5 and r_arm["tokens"] == 5 * L
    assert r_arm["nll_per_token"] == pytest.approx(want, rel=1e-5) and r_arm["stderr"] == 0
    e = elbo_nll(mdm_m, x, prompt_lens=[1] * 5, segment_ids=seg, n_samples=8, row_ids=b["index"].numpy())
    assert r_mdm["nll_per_token"] == pytest.approx(float(e.nll.sum()) / (5 * L), rel=1e-6)
    assert r_mdm["stderr"] > 0 and r_mdm["ppl"] == pytest.approx(math.exp(r_mdm["nll_per_token"]))
    # the windows share their t_k: the standard error of the total comes from the per-sample totals
    # (`sum_stderr`; the root of the windows' summed squared stderrs understated it)
    torch.testing.assert_close(e.samples.mean(0), e.nll)
    torch.testing.assert_close(e.samples.std(0) / math.sqrt(8), e.stderr)
    want = sum_stderr(e.samples.sum(1), e.times, stratified=e.stratified) / (5 * L)
    assert r_mdm["stderr"] == pytest.approx(want, rel=1e-6)
    assert torch.equal(e.times, torch.from_numpy(elbo_times(8, 0)))
    # one record per window (the --json help promised per-item records and there were none)
    per_window = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").double().sum(1)
    assert [r["window"] for r in r_arm["records"]] == b["index"].tolist() == [r["window"] for r in r_mdm["records"]]
    assert all(r["tokens"] == L and "stderr" not in r for r in r_arm["records"])
    np.testing.assert_allclose([r["nll"] for r in r_arm["records"]], per_window.numpy(), rtol=1e-5)
    np.testing.assert_allclose([r["nll"] for r in r_mdm["records"]], e.nll.numpy(), rtol=1e-6)
    np.testing.assert_allclose([r["stderr"] for r in r_mdm["records"]], e.stderr.numpy(), rtol=1e-6)
    (tmp_path / "tokenizer.json").write_bytes((prepared / "tokenizer.json").read_bytes())
    ck = [_save(tmp_path, mdm_m, "mdm"), _save(tmp_path, arm_m, "arm")]
    rc = evaluate.main(["ppl", "--ckpt", str(ck[0]), "--ckpt", str(ck[1]), "--data", str(prepared),
                        "--seq-len", str(L), "--limit", "5", "--n-samples", "8", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and "(MDM): [elbo] 5 windows, seq-len 24" in out and "(exact)" in out
    r_count = evaluate.evaluate_ppl(mdm_m, prepared, seq_len=L, limit=5, batch_size=2, n_samples=8,
                                    estimator="count")
    e = elbo_nll(mdm_m, x, prompt_lens=[1] * 5, segment_ids=seg, n_samples=8, row_ids=b["index"].numpy(),
                 estimator="count")
    assert r_count["estimator"] == "count" and r_mdm["estimator"] == "time" and "estimator" not in r_arm
    assert r_count["nll_per_token"] == pytest.approx(float(e.nll.sum()) / (5 * L), rel=1e-6)
    rc = evaluate.main(["ppl", "--ckpt", str(ck[0]), "--ckpt", str(ck[1]), "--data", str(prepared),
                        "--seq-len", str(L), "--limit", "5", "--n-samples", "8", "--device", "cpu",
                        "--estimator", "count", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr()
    assert rc == 0 and "(MDM): [elbo count] 5 windows, seq-len 24" in out.out
    assert "--estimator" in out.err  # the ARM's likelihood is exact: the option is noted as unused for it
    res = json.loads((tmp_path / "r.json").read_text())["results"]
    assert res[0]["nll_per_token"] == pytest.approx(r_count["nll_per_token"], rel=1e-9)
    assert [len(r["records"]) for r in res] == [5, 5]



def test_ppl_data_of_another_vocabulary_is_refused_and_another_tokenizer_noted(prepared, tmp_path, capsys):
    """Shards whose vocab_size differs from the model's (another tokenizer) are refused as `smdm train
    --init-from` refuses them, naming both sizes: more ids would index past the embedding (or read as the MDM's
    mask id), fewer were scored without a word. Equal sizes but a tokenizer.json whose hash is not the
    manifest's tokenizer_hash: a note (the same tokenizer saved again can hash differently), not an error."""
    from smdm.data import load_manifest, resolve_dataset

    root = resolve_dataset(prepared, "val")
    vocab = load_manifest(root).vocab_size
    for causal, v in itertools.product((False, True), (vocab - 1, vocab + 1)):
        with pytest.raises(ValueError, match=f"the model has vocab_size {v}, the data has {vocab} "
                                             rf"\({root}: another tokenizer\?\)"):
            evaluate.evaluate_ppl(_model(causal, vocab=v), prepared, seq_len=16, limit=2, n_samples=4)
    tok = (prepared / "tokenizer.json").read_bytes()
    (tmp_path / "tokenizer.json").write_bytes(tok)
    ck = _save(tmp_path, _model(False, vocab=vocab + 1), "mdm")
    argv = ["ppl", "--data", str(prepared), "--seq-len", "16", "--limit", "2", "--n-samples", "4", "--device", "cpu"]
    assert evaluate.main([*argv, "--ckpt", str(ck)]) == 2
    assert f"--ckpt {ck} has vocab_size {vocab + 1}, the data has {vocab}" in capsys.readouterr().err
    same = _save(tmp_path, _model(False, vocab=vocab), "same")
    (tmp_path / "tokenizer.json").write_bytes(tok + b"\n")  # the same tokenizer, other bytes
    resaved = _save(tmp_path, _model(False, vocab=vocab), "resaved")
    assert evaluate.main([*argv, "--ckpt", str(same), "--ckpt", str(resaved)]) == 0
    err = capsys.readouterr().err
    assert err.count("note") == 1 and f"{resaved}/tokenizer.json is not the tokenizer.json {root}/manifest.json " \
        "records" in err, err


def test_ppl_default_seq_len_is_the_training_length(prepared, tmp_path, capsys):
    """Without --seq-len, windows as the checkpoints were trained (it was 511 whatever they were trained at:
    length extrapolation): `train --seq-len 16` is windows of 16 tokens for the MDM (L = 15), 17 for the ARM
    (L = 16); for both the shorter, so they score the same windows; a checkpoint without a train section keeps
    min(512, context - 1). The output says which L ran."""
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(prepared / "tokenizer.json")).get_vocab_size()
    (tmp_path / "tokenizer.json").write_bytes((prepared / "tokenizer.json").read_bytes())
    ck = {}
    for name, causal in (("mdm", False), ("arm", True)):
        m = _model(causal, vocab=vocab)
        ck[name] = checkpoint.save(tmp_path / name, 1, model_state=m.state_dict(), train_state={"step": 1},
                                   config={"model": m.config.to_dict(), "objective": name, "train": {"seq_len": 16}},
                                   tokenizer_path=tmp_path / "tokenizer.json")
    ck["plain"] = _save(tmp_path, _model(False, vocab=vocab), "plain")  # no train section: context 64
    argv = ["ppl", "--data", str(prepared), "--limit", "1", "--n-samples", "2", "--device", "cpu"]
    for names, L, why in ((["mdm"], 15, f"windows of 16 tokens, as {ck['mdm']} was trained on"),
                          (["arm"], 16, f"windows of 17 tokens, as {ck['arm']} was trained on"),
                          (["mdm", "arm"], 15, f"as {ck['mdm']} was trained on"),
                          (["plain"], 63, f"{ck['plain']} does not record its training length")):
        out = tmp_path / "r.json"
        rc = evaluate.main([*argv, *(a for n in names for a in ("--ckpt", str(ck[n]))), "--json", str(out)])
        cap = capsys.readouterr()
        assert rc == 0, cap.err
        assert f"note: --seq-len {L} (" in cap.err and why in cap.err, cap.err
        assert cap.out.count(f"1 windows, seq-len {L}") == len(names), cap.out
        assert [r["seq_len"] for r in json.loads(out.read_text())["results"]] == [L] * len(names)
    assert evaluate.main([*argv, "--ckpt", str(ck["mdm"]), "--seq-len", "8"]) == 0  # given: no note
    cap = capsys.readouterr()
    assert "seq-len 8" in cap.out and "note" not in cap.err


# ---- a tiny trained pair ---------------------------------------------------------------------------------------

def test_trained_twins_answer_a_context_dependent_task(tmp_path, capsys):
    """Train a tiny MDM and its ARM twin (80 steps) on "the <animal> <sound> ." sentences: every sound is
    equally frequent, so only a model that reads the context beats chance (1/4) on "the cat" -> " meows"."""
    import random

    from smdm.config import TrainConfig
    from smdm.data_cli import prepare
    from smdm.train import train

    sounds = {"cat": "meows", "dog": "barks", "bird": "sings", "fish": "swims"}
    rnd = random.Random(0)
    docs = [f"the {a} {sounds[a]} ." for a in (rnd.choice(list(sounds)) for _ in range(1000))]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    prepare([str(tmp_path / "docs.jsonl")], tmp_path / "data", vocab_size=300, val_fraction=0.2,
            shard_tokens=20000, progress=False, log=lambda m: None)
    threads = torch.get_num_threads()
    try:
        with torch.enable_grad():  # the autouse fixture of this file turned gradients off
            for kind in ("mdm", "ar"):
                train(TrainConfig(config="tiny", data=str(tmp_path / "data"), out=str(tmp_path / kind),
                                  objective=kind, max_steps=80, batch_size=16, seq_len=32, val_every=0,
                                  save_every=0, samples=0, threads=1))
    finally:
        torch.set_num_threads(threads)  # the trainer set 1 for the process
    animals = list(sounds)
    items = [{"context": f"the {a}", "choices": [" " + sounds[b] for b in animals], "label": i}
             for i, a in enumerate(animals)]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    out = tmp_path / "r.json"
    rc = evaluate.main(["mc", "--ckpt", str(tmp_path / "mdm"), "--ckpt", str(tmp_path / "ar"), "--data",
                        str(tmp_path / "mc.jsonl"), "--n-samples", "32", "--device", "cpu", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert [r["acc"] for r in json.loads(out.read_text())["results"]] == [1.0, 1.0]
    rc = evaluate.main(["mc", "--ckpt", str(tmp_path / "mdm"), "--data", str(tmp_path / "mc.jsonl"),
                        "--method", "chain", "--device", "cpu", "--json", str(out)])
    assert rc == 0 and json.loads(out.read_text())["results"][0]["acc"] == 1.0


def test_score_names_bad_inputs():
    """Text instead of ids, floats, and a float n_samples are ValueErrors naming the pair, item or option
    (they were int()'s "invalid literal" or a TypeError from deep inside)."""
    from smdm.evaluate import score, score_positions
    from smdm.model import ModelConfig, build_model

    mdm = build_model(ModelConfig(n_layer=1, n_head=2, d_model=16, d_ff=32, vocab_size=20)).eval()
    for pairs, msg in (([([1], [2]), ("def ", [3])], r"pair 1's context is text \('def '\)"),
                       ([([1], [2.5])], r"pair 0's continuation holds 2\.5")):
        with pytest.raises(ValueError, match=msg):
            score(mdm, pairs, n_samples=4)
    with pytest.raises(ValueError, match=r"item 0's positions holds 1\.0: positions are ints"):
        score_positions(mdm, [([1, 2, 3], [1.0])], n_samples=4)
    with pytest.raises(ValueError, match=r"item 0's positions is a set, which has no order: pass a list of "
                                         r"positions$"):
        score_positions(mdm, [([1, 2, 3], {1, 2})], n_samples=4)
    with pytest.raises(ValueError, match=r"n_samples must be an int, got 8\.0"):
        score(mdm, [([1], [2])], n_samples=8.0)
    assert score(mdm, [(np.array([1]), torch.tensor([2]))], n_samples=np.int64(4)).nll.shape == (1,)
    assert score(mdm, [([1], [2])], method="chain", n_samples=None).nll.shape == (1,)  # n_samples: elbo only


def test_elbo_estimators_bench_runs_and_its_means_are_elbo_nll(ckpts, prepared, tmp_path, capsys):
    """benches/elbo_estimators.py on a random MDM: every figure is there, and each estimator's mean is the mean
    of `elbo_nll` over the same windows and seeds, recomputed here."""
    import importlib.util

    import smdm

    path = Path(__file__).resolve().parents[1] / "benches" / "elbo_estimators.py"
    spec = importlib.util.spec_from_file_location("elbo_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    assert bench.main(["--ckpt", str(ckpts["mdm"]), "--data", str(prepared), "--windows", "3", "--seq-len", "16",
                       "--n-samples", "4", "--seeds", "3", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert "variance time / count" in capsys.readouterr().out
    model, _ = smdm.load(ckpts["mdm"], device="cpu")
    x, seg, ids = bench.windows(str(prepared), 16, 3)
    for name in ("time", "count"):
        want = np.mean([elbo_nll(model, x, prompt_lens=[1] * 3, segment_ids=seg, n_samples=4, seed=s, row_ids=ids,
                                 estimator=name).nll.numpy() / 16 for s in range(3)])
        assert r[name]["mean_nll_per_token"] == pytest.approx(want, rel=1e-9), name
        assert r[name]["spread_per_token"] > 0 and r[name]["reported_stderr_per_token"] > 0
    assert r["variance_ratio_time_over_count"]["median"] > 0
    with pytest.raises(SystemExit):
        bench.main(["--ckpt", str(ckpts["ar"]), "--data", str(prepared)])

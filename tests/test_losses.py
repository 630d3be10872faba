# python -m pytest tests/test_losses.py -q
"""Losses and the Monte Carlo ELBO against plain full-logits references in float64 (DESIGN §4)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from smdm import diffusion
from smdm.diffusion import ar_loss, elbo_exact, elbo_nll, mdm_loss, sft_loss
from smdm.model import ModelConfig, build_model


def tiny(vocab=11, causal=False, seed=0, sharpen=1.0):
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=16, d_ff=32, vocab_size=vocab, max_seq_len=64,
                      causal=causal)
    model = build_model(cfg, seed=seed).double()
    with torch.no_grad():  # larger weights -> peaked conditionals, so bounds are not trivially tight
        model.embed.weight.mul_(sharpen)
        model.head.weight.mul_(sharpen)
    return model.eval()


def random_masking(B, L, vocab, mask_id, eps=1e-3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, vocab, (B, L), generator=g)
    t = torch.rand(B, generator=g, dtype=torch.float64)
    p = (1 - eps) * t + eps
    mask = torch.rand(B, L, generator=g, dtype=torch.float64) < p[:, None]
    noisy = torch.where(mask, torch.full_like(x0, mask_id), x0)
    weight = torch.where(mask, (1 / p)[:, None].expand(B, L), torch.zeros(B, L, dtype=torch.float64)).float()
    return x0, noisy, mask, weight


def test_mdm_loss_matches_full_logits_reference():
    model = tiny()
    x0, noisy, mask, weight = random_masking(4, 12, 11, model.mask_id)
    assert mask.any() and not mask.all()
    loss = mdm_loss(model, noisy, x0, mask, weight)
    logits = model(noisy)  # (B, L, V) full reference
    ce = F.cross_entropy(logits.reshape(-1, 11), x0.reshape(-1), reduction="none").reshape(4, 12)
    ref = (ce * mask * weight.double()).sum() / (4 * 12)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-9)


def test_mdm_loss_gradient_matches_reference():
    model = tiny()
    x0, noisy, mask, weight = random_masking(3, 10, 11, model.mask_id, seed=1)
    mdm_loss(model, noisy, x0, mask, weight).backward()
    fast = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ce = F.cross_entropy(model(noisy).reshape(-1, 11), x0.reshape(-1), reduction="none").reshape(3, 10)
    ((ce * mask * weight.double()).sum() / 30).backward()
    for a, p in zip(fast, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-6, atol=1e-6)


def test_mdm_loss_without_masked_tokens_is_finite_zero():
    model = tiny()
    x0 = torch.randint(0, 11, (2, 8))
    mask = torch.zeros(2, 8, dtype=torch.bool)
    loss = mdm_loss(model, x0, x0, mask, torch.zeros(2, 8))
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()  # a graph exists; gradients are zero, never NaN
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_forward_process_weights_never_exceed_one_over_eps():
    tokens = torch.randint(0, 50, (256, 32))
    out = diffusion.forward_process(tokens, seed=3, step=7, sample_offset=0, global_batch=256, mask_id=50,
                                    stratified=True)
    weight, mask = out.weight, out.mask
    assert float(weight.max()) <= 1 / 1e-3 * (1 + 1e-6)
    assert (weight[~mask] == 0).all() and (weight[mask] >= 1).all()


def test_sft_loss_matches_reference():
    model = tiny()
    B, L = 3, 10
    x0, _, _, _ = random_masking(B, L, 11, model.mask_id, seed=2)
    prompt_lens = torch.tensor([2, 5, 0])
    g = torch.Generator().manual_seed(5)
    p = torch.tensor([0.3, 0.9, 0.5], dtype=torch.float64)
    pos = torch.arange(L)[None]
    mask = (torch.rand(B, L, generator=g, dtype=torch.float64) < p[:, None]) & (pos >= prompt_lens[:, None])
    noisy = torch.where(mask, torch.full_like(x0, model.mask_id), x0)
    weight = torch.where(mask, (1 / p)[:, None].expand(B, L), torch.zeros(B, L, dtype=torch.float64)).float()
    loss = sft_loss(model, noisy, x0, mask, weight, prompt_lens)
    ce = F.cross_entropy(model(noisy).reshape(-1, 11), x0.reshape(-1), reduction="none").reshape(B, L)
    per_seq = (ce * mask * weight.double()).sum(1) / (L - prompt_lens)
    torch.testing.assert_close(loss.double(), per_seq.mean(), rtol=1e-6, atol=1e-9)


def test_sft_loss_with_prompt_drop_from_the_forward_process():
    from smdm.diffusion import forward_process

    model = tiny()
    x0 = torch.randint(0, 11, (64, 8))
    lens = torch.full((64,), 3)
    nb = forward_process(x0, seed=1, step=2, mask_id=model.mask_id, prompt_lens=lens, p_uncond=0.5,
                         crop_prob=0.0)
    assert nb.uncond.any() and (~nb.uncond).any()
    assert not nb.mask[:, :3].any()  # prompts are never targets, dropped or not
    assert (nb.noisy_ids[nb.uncond, :3] == model.mask_id).all()
    loss = sft_loss(model, nb.noisy_ids, x0, nb.mask, nb.weight, lens)
    ce = F.cross_entropy(model(nb.noisy_ids).reshape(-1, 11), x0.reshape(-1), reduction="none").reshape(64, 8)
    ref = ((ce * nb.mask * nb.weight.double()).sum(1) / 5).mean()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-9)


def test_ar_loss_matches_reference():
    model = tiny(causal=True)
    tokens = torch.randint(0, 11, (3, 9))
    loss = ar_loss(model, tokens)
    ref = 0.0
    for b in range(3):  # one prefix at a time: no reliance on the causal mask being right
        for i in range(8):
            logp = torch.log_softmax(model(tokens[b:b + 1, :i + 1])[0, -1], -1)
            ref = ref - logp[tokens[b, i + 1]]
    torch.testing.assert_close(loss.double(), ref / 24, rtol=1e-6, atol=1e-9)


def test_ar_loss_with_documents_is_each_document_alone():
    """Packed windows with segment ids: each prediction sees its own document only, so the loss equals running
    every document's inputs alone (RoPE is relative: its own positions from 0 give the same scores). A window of
    L + 1 tokens predicts tokens 1..L from inputs 0..L-1 and the inputs' segment ids decide what each sees: the
    EOS closing a document (its last input) predicts the next document's first token from its own document."""
    model = tiny(causal=True)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 11, (2, 13), generator=g)
    seg = torch.tensor([[0] * 4 + [1] * 5 + [2] * 4, [0] * 7 + [1] * 6])  # (2, L + 1)
    loss = ar_loss(model, tokens, segment_ids=seg)
    ref = 0.0
    for b in range(2):
        inputs, targets, s = tokens[b, :-1], tokens[b, 1:], seg[b, :-1]
        for d in s.unique():
            idx = (s == d).nonzero()[:, 0]
            logp = torch.log_softmax(model(inputs[idx][None])[0].double(), -1)  # the document alone
            ref = ref - logp.gather(-1, targets[idx][:, None]).sum()
    torch.testing.assert_close(loss.double(), ref / 24, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(loss, ar_loss(model, tokens))  # the documents matter here


def _exact_nll(model, tokens, prompt_len):
    """-log p(target | prompt) of the continuous-time reverse process: every target token is revealed at its
    own time, in a uniformly random order, so p = mean over orders of the product of the conditionals."""
    L = tokens.shape[0]
    targets = list(range(prompt_len, L))
    probs = []
    for order in itertools.permutations(targets):
        x = tokens.clone()
        x[targets] = model.mask_id
        logp = 0.0
        for j in order:
            with torch.no_grad():
                logp += torch.log_softmax(model(x[None])[0, j], -1)[tokens[j]].item()
            x[j] = tokens[j]
        probs.append(math.exp(logp))
    return -math.log(sum(probs) / len(probs))


def test_exact_reverse_process_likelihood_is_normalised():
    model = tiny(vocab=4, sharpen=4.0)
    total = sum(math.exp(-_exact_nll(model, torch.tensor([1, *seq]), 1))
                for seq in itertools.product(range(4), repeat=2))
    assert abs(total - 1.0) < 1e-9


@pytest.mark.parametrize("prompt_len", [0, 2])
def test_elbo_bounds_the_exact_nll_and_mc_converges(prompt_len):
    model = tiny(vocab=5, sharpen=4.0, seed=3)
    tokens = torch.tensor([[1, 3, 0, 4, 2]])
    lens = torch.tensor([prompt_len])
    tokens = tokens[:, : prompt_len + 3]  # three target tokens: 3! orders, 7 mask sets
    exact = _exact_nll(model, tokens[0], prompt_len)
    analytic = elbo_exact(model, tokens, lens)[0].item()
    assert analytic >= exact - 1e-9  # Jensen: the ELBO is an upper bound on the NLL
    assert analytic - exact > 1e-3  # ... and not an identity on this model
    est = elbo_nll(model, tokens, prompt_lens=lens, n_samples=4096, seed=1, max_rows=4096)
    assert est.stderr.item() > 0
    assert abs(est.nll.item() - analytic) < 4 * est.stderr.item(), (est.nll.item(), analytic)
    assert int(est.n_tokens[0]) == 3


def test_elbo_estimate_does_not_depend_on_batch_layout():
    model = tiny()
    tokens = torch.randint(0, 11, (4, 7))
    lens = torch.tensor([0, 1, 2, 3])
    full = elbo_nll(model, tokens, prompt_lens=lens, n_samples=16, seed=2, max_rows=64)
    part = elbo_nll(model, tokens[2:], prompt_lens=lens[2:], n_samples=16, seed=2, row_ids=[2, 3], max_rows=3)
    torch.testing.assert_close(full.nll[2:], part.nll, rtol=1e-12, atol=1e-12)


def test_elbo_rejects_the_arm_and_one_sample():
    with pytest.raises(ValueError, match="bidirectional"):
        elbo_nll(tiny(causal=True), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="n_samples"):
        elbo_nll(tiny(), torch.zeros(1, 3, dtype=torch.long), n_samples=1)
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, length\), got shape \(3,\)"):
        tiny()(torch.zeros(3, dtype=torch.long))


def test_sum_stderr_is_calibrated_for_stratified_times_with_a_shared_offset():
    """sum_stderr on draws S_k = f(t_k) + noise with t_k = (k + 1 - u) / n, one u per estimate: over many
    estimates its root mean square matches the true spread of mean(S) (std(S) / sqrt(n) counts the trend
    stratification cancels: over 2x too large with a trend), for a trend alone, noise alone and both; i.i.d. times
    take the plain formula; and the times come from elbo_times."""
    from smdm.diffusion import elbo_times, sum_stderr

    gen = np.random.default_rng(0)
    n, reps = 16, 4000
    for slope, noise in ((100.0, 1.0), (0.0, 5.0), (60.0, 5.0)):
        means, est, plain = [], [], []
        for _ in range(reps):
            t = (np.arange(n) + 1.0 - gen.random()) / n
            s = torch.from_numpy(slope * t + 10 * t ** 2 + noise * gen.standard_normal(n))
            means.append(float(s.mean()))
            est.append(sum_stderr(s, torch.from_numpy(t), stratified=True))
            plain.append(float(s.std()) / math.sqrt(n))
        spread, rms = float(np.std(means, ddof=1)), math.sqrt(float(np.mean(np.square(est))))
        assert 0.9 < spread / rms < 1.15, (slope, noise, spread, rms)
        if slope:
            assert math.sqrt(float(np.mean(np.square(plain)))) > 2 * spread
    s = torch.tensor([1.0, 4.0, 2.0, 8.0])
    assert sum_stderr(s, torch.rand(4), stratified=False) == pytest.approx(float(s.std()) / 2)
    two = sum_stderr(s[:2], torch.tensor([0.2, 0.7]), stratified=True)  # no residual: the plain formula
    assert two == pytest.approx(float(s[:2].std()) / math.sqrt(2))
    e = elbo_nll(tiny(), torch.randint(0, 11, (2, 5)), n_samples=6, seed=3)
    assert torch.equal(e.times, torch.from_numpy(elbo_times(6, 3))) and e.stratified


def test_elbo_takes_int32_ids_as_int64():
    """int32 ids (elbo_exact, forward_process, generate and score take them) were a RuntimeError deep in the CE."""
    model, tokens = tiny(), torch.randint(0, 11, (2, 5))
    want = elbo_nll(model, tokens, n_samples=4)
    got = elbo_nll(model, tokens.int(), n_samples=4)
    assert torch.equal(got.nll, want.nll) and torch.equal(got.samples, want.samples)
    for bad in (tokens.float() + 0.7, tokens > 5):  # never truncated to ids
        with pytest.raises(ValueError, match="tokens must be integer ids, got torch.(float32|bool)"):
            elbo_nll(model, bad, n_samples=4)


# ---- noise schedules: the ELBO does not depend on the schedule, a mismatched weight does ----

SCHEDULES = ["linear", "cosine", "polynomial:2", "polynomial:0.5"]


class _LinearWeights(diffusion.Schedule):
    """A deliberately wrong ELBO: the schedule's masks with the linear weight 1/t."""

    def weight(self, t):
        return diffusion.Schedule("linear").weight(t)


def test_elbo_is_schedule_invariant_and_needs_the_matching_weight(one_thread):
    """With p = 1 - alpha_t, w(t) dt = dp/p: the continuous-time ELBO is the same for every schedule, so each
    schedule's Monte Carlo estimate agrees with `elbo_exact` and with the others within a few standard errors
    (deterministic seeds); cosine or t^2 masks weighted by 1/t are far off."""
    model = tiny(vocab=5, sharpen=4.0, seed=3)
    tokens = torch.tensor([[1, 3, 0, 4, 2, 1]])
    lens = torch.tensor([1])  # five target tokens
    exact = elbo_exact(model, tokens, lens)[0].item()
    est = {}
    for name in SCHEDULES:
        e = elbo_nll(model, tokens, prompt_lens=lens, n_samples=2048, seed=1, max_rows=2048, schedule=name)
        est[name] = (e.nll.item(), e.stderr.item())
        assert abs(e.nll.item() - exact) < 4 * e.stderr.item(), (name, est[name], exact)
    for a, b in itertools.combinations(SCHEDULES, 2):
        (ma, sa), (mb, sb) = est[a], est[b]
        assert abs(ma - mb) < 4 * math.hypot(sa, sb), (a, b, est)
    for wrong in (_LinearWeights("cosine"), _LinearWeights("polynomial", 2.0)):
        e = elbo_nll(model, tokens, prompt_lens=lens, n_samples=2048, seed=1, max_rows=2048, schedule=wrong)
        assert abs(e.nll.item() - exact) > 10 * e.stderr.item(), (wrong, e.nll.item(), exact)
        m, s = est[{"cosine": "cosine", "polynomial": "polynomial:2"}[wrong.kind]]
        assert abs(e.nll.item() - m) > 10 * math.hypot(s, e.stderr.item())


@pytest.mark.parametrize("schedule", ["cosine", "polynomial:2", "linear"])
def test_mdm_loss_with_a_schedule_estimates_the_elbo(schedule, one_thread):
    """`mdm_loss` reads the weights of `forward_process(schedule=)`, so L · loss is an unbiased estimate of
    the per-sequence ELBO for any schedule (up to the eps floor, ~0.1% here): 32 independent batches of 256
    copies (i.i.d. t) against `elbo_exact`. Weighting the same masks by 1/t' instead is far off."""
    model = tiny(vocab=5, sharpen=4.0, seed=3)
    tokens = torch.tensor([[1, 3, 0, 4, 2]])
    L = tokens.shape[1]
    exact = elbo_exact(model, tokens)[0].item()
    x0 = tokens.expand(256, L).contiguous()
    good, wrong = [], []
    with torch.no_grad():
        for step in range(32):
            nb = diffusion.forward_process(x0, seed=4, step=step, mask_id=model.mask_id, crop_prob=0.0,
                                           schedule=schedule)
            good.append(L * mdm_loss(model, nb.noisy_ids, x0, nb.mask, nb.weight).item())
            w_lin = torch.where(nb.mask, (1 / ((1 - 1e-3) * nb.t + 1e-3))[:, None], 0.0).float()
            wrong.append(L * mdm_loss(model, nb.noisy_ids, x0, nb.mask, w_lin).item())
    for vals, ok in ((good, True), (wrong, schedule == "linear")):
        v = torch.tensor(vals, dtype=torch.float64)
        mean, se = v.mean().item(), v.std().item() / math.sqrt(len(v))
        assert (abs(mean - exact) < 4 * se) == ok, (schedule, ok, mean, se, exact)
        if not ok:
            assert abs(mean - exact) > 10 * se


def test_elbo_masks_use_the_schedule_and_linear_is_unchanged():
    B, L, n = 2, 2048, 8
    t = np.linspace(0.1, 1.0, n)
    target = torch.ones(B, L, dtype=torch.bool)
    lin = diffusion.elbo_masks(B, L, n, 0, n, 5, [3, 4], t, target)
    assert torch.equal(lin, diffusion.elbo_masks(B, L, n, 0, n, 5, [3, 4], t, target, "linear"))
    cos = diffusion.elbo_masks(B, L, n, 0, n, 5, [3, 4], t, target, "cosine")
    p = 1 - np.cos(np.pi / 2 * t)
    frac = cos.double().mean(dim=(1, 2)).numpy()
    assert np.all(np.abs(frac - p) <= 5 * np.sqrt(p * (1 - p) / (B * L)) + 1e-12)
    assert torch.equal(cos, lin & cos) and not torch.equal(cos, lin)  # same draws, lower thresholds
    # the linear estimate is the division by t_k as before, and schedule="linear" changes nothing
    model = tiny()
    tokens = torch.randint(0, 11, (2, 7), generator=torch.Generator().manual_seed(0))
    a = elbo_nll(model, tokens, n_samples=16, seed=2)
    b = elbo_nll(model, tokens, n_samples=16, seed=2, schedule="linear")
    assert torch.equal(a.nll, b.nll) and torch.equal(a.stderr, b.stderr)
    with pytest.raises(ValueError, match="unknown schedule 'cosin'"):
        elbo_nll(model, tokens, n_samples=4, schedule="cosin")


def test_count_estimator_masks_exactly_l_of_the_targets():
    """estimator="count": sample k masks exactly l = ceil(t_k T) targets (never a prompt position), the ones
    with the smallest draws; with n a multiple of T the stratified times give every l in 1..T exactly n/T times."""
    B, L, n = 3, 11, 24
    lens = torch.tensor([0, 3, 7])  # T = 11, 8, 4
    target = torch.arange(L)[None, :] >= lens[:, None]
    u = diffusion.rng.uniform(diffusion.rng.key(4, 0, 0, diffusion.rng.Stream.STRATIFIED, 0))
    t = (np.arange(n) + 1.0 - u) / n
    masks = diffusion.elbo_masks(B, L, n, 0, n, 4, [5, 6, 7], t, target, estimator="count")  # (n, B, L)
    assert not (masks & ~target[None]).any()
    counts = masks.sum(-1).numpy()  # (n, B)
    T = target.sum(1).numpy()
    assert np.array_equal(counts, diffusion.elbo_counts(t, T))
    assert counts.min() >= 1 and (counts <= T[None]).all()
    assert sorted(counts[:, 2].tolist()) == sorted(list(range(1, 5)) * 6)  # n = 24 = 6 * T for the T = 4 row
    time_masks = diffusion.elbo_masks(B, L, n, 0, n, 4, [5, 6, 7], t, target)  # the same draws
    for k in range(n):  # the masked set of l is the l smallest draws: it holds the time mask of that size
        for b in range(B):
            if time_masks[k, b].sum() == counts[k, b]:
                assert torch.equal(time_masks[k, b], masks[k, b])
    assert np.array_equal(diffusion.elbo_counts([0.01, 0.5, 1.0], [0, 1, 10]), [[0, 1, 1], [0, 1, 5], [0, 1, 10]])
    with pytest.raises(ValueError, match="estimator must be one of"):
        diffusion.elbo_masks(B, L, n, 0, n, 4, [5, 6, 7], t, target, estimator="counts")


@pytest.mark.parametrize("prompt_len", [0, 2])
def test_count_estimator_is_unbiased_with_a_smaller_spread(prompt_len):
    """The count estimator's expectation is the enumerated ELBO (weights 1 / (m C(T, m)) per mask set, as
    elbo_exact's); over 400 seeds of 8 samples its spread is below the time estimator's, and its reported
    standard error matches its spread, where the time estimator's understates it (linear: infinite variance)."""
    model = tiny(vocab=5, sharpen=4.0, seed=3)
    tokens = torch.tensor([[1, 3, 0, 4, 2, 2, 1]])[:, : prompt_len + 4]
    lens = torch.tensor([prompt_len])
    exact = elbo_exact(model, tokens, lens)[0].item()
    est = elbo_nll(model, tokens, prompt_lens=lens, n_samples=4096, seed=1, max_rows=4096, estimator="count")
    assert est.estimator == "count" and est.stderr.item() > 0
    assert abs(est.nll.item() - exact) < 4 * est.stderr.item(), (est.nll.item(), exact, est.stderr.item())
    many = tokens.expand(400, -1)  # 400 estimates, one row id each: their own mask draws (one shared u of t)
    spread = {}
    for name in ("time", "count"):
        e = elbo_nll(model, many, prompt_lens=lens.expand(400), n_samples=8, seed=9, max_rows=4096,
                     estimator=name, row_ids=np.arange(400))
        spread[name] = (e.nll.std().item(), e.stderr.median().item())
    assert spread["count"][0] < 0.7 * spread["time"][0], spread
    assert 0.7 < spread["count"][1] / spread["count"][0] < 1.3, spread
    with pytest.raises(ValueError, match="estimator must be one of"):
        elbo_nll(model, tokens, n_samples=4, estimator="llada")


def test_losses_of_a_float64_model_are_float64():
    """The CE is computed in at least float32: a float64 model keeps float64 (it used to be rounded to
    float32, so the float64 references above only agreed to ~1e-7)."""
    model = tiny()
    x0, noisy, mask, weight = random_masking(4, 12, 11, model.mask_id, seed=3)
    loss = mdm_loss(model, noisy, x0, mask, weight)
    ce = F.cross_entropy(model(noisy).reshape(-1, 11), x0.reshape(-1), reduction="none").reshape(4, 12)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, (ce * mask * weight.double()).sum() / 48, rtol=1e-13, atol=0)
    lens = torch.tensor([2, 0, 5, 11])
    loss = sft_loss(model, noisy, x0, mask & (torch.arange(12) >= lens[:, None]), weight, lens)
    ref = ((ce * (mask & (torch.arange(12) >= lens[:, None])) * weight.double()).sum(1) / (12 - lens)).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-13, atol=0)
    arm = tiny(causal=True)
    loss = ar_loss(arm, x0)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, F.cross_entropy(arm(x0[:, :-1]).reshape(-1, 11), x0[:, 1:].reshape(-1)),
                               rtol=1e-13, atol=0)
    # the Monte Carlo ELBO from its own masks (`elbo_masks`) and stratified times, full logits in float64
    n, tokens = 4, x0[:2]
    u = diffusion.rng.uniform(diffusion.rng.key(7, 0, 0, diffusion.rng.Stream.STRATIFIED, 0))
    t = (np.arange(n) + 1.0 - u) / n
    masks = diffusion.elbo_masks(2, 12, n, 0, n, 7, [0, 1], t, torch.ones(2, 12, dtype=torch.bool))
    per = torch.zeros(n, 2, dtype=torch.float64)
    for k in range(n):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.where(masks[k], model.mask_id, tokens)), -1)
        per[k] = -(logp.gather(-1, tokens[..., None])[..., 0] * masks[k]).sum(1) / t[k]
    est = elbo_nll(model, tokens, n_samples=n, seed=7)
    torch.testing.assert_close(est.nll, per.mean(0), rtol=1e-13, atol=0)


def test_losses_refuse_the_other_kind_of_model():
    """ar_loss on the bidirectional MDM would see its targets (a silently meaningless number); the MDM losses
    on the ARM twin failed with an IndexError deep in the embedding (no mask row)."""
    mdm, arm = tiny(), tiny(causal=True)
    x = torch.randint(0, 11, (2, 9))
    with pytest.raises(ValueError, match="ar_loss is for the autoregressive twin"):
        ar_loss(mdm, x)
    mask = torch.ones(2, 9, dtype=torch.bool)
    w = torch.ones(2, 9, dtype=torch.float64)
    with pytest.raises(ValueError, match="mdm_loss is for the MDM"):
        mdm_loss(arm, x, x, mask, w)
    with pytest.raises(ValueError, match="sft_loss is for the MDM"):
        sft_loss(arm, x, x, mask, w, torch.tensor([2, 3]))


def test_forward_process_takes_0d_integer_tensors():
    x = torch.randint(0, 11, (2, 9))
    a = diffusion.forward_process(x, seed=torch.tensor(3), step=torch.tensor(1), mask_id=torch.tensor(11))
    b = diffusion.forward_process(x, seed=3, step=1, mask_id=11)
    assert torch.equal(a.noisy_ids, b.noisy_ids) and torch.equal(a.weight, b.weight)
    with pytest.raises(ValueError, match=r"mask_id must be an integer, got 11\.0"):
        diffusion.forward_process(x, seed=3, step=1, mask_id=11.0)

# smdm eval mc --ckpt runs/mdm --ckpt runs/arm --data tasks.jsonl --n-samples 128 --json results.json
"""`smdm eval`: likelihood and generation benchmarks of an MDM against its autoregressive twin (the paper's
zero-shot comparisons, Nie et al. 2024), measured the same way for both.

    smdm eval mc    --ckpt DIR [--ckpt DIR ...] --data F.jsonl [--n-samples N] [--cfg W] [--method elbo|chain]
    smdm eval gsm8k --ckpt DIR [--ckpt DIR ...] --data test.jsonl [--few-shot K] [--gen-length 256] ...
    smdm eval ppl   --ckpt DIR [--ckpt DIR ...] --data SHARDS [--seq-len L] [--n-samples N]
    smdm eval harness --ckpt DIR [--ckpt DIR ...] --tasks T [--include-path P]   (lm-eval tasks: smdm.harness)

Library: `score(model, pairs)` -> `Scores` (-log p(continuation | context) per (context, continuation) pair
of token ids), `score_positions(model, items)` -> `Scores` (-log p(x[positions] | every other token) per
(ids, positions) item: infilling likelihood, the same estimators with the target positions anywhere; `score`
is the case of a suffix, with identical numbers), `evaluate_mc`, `evaluate_gsm8k`, `evaluate_ppl`,
`extract_answer`.

Scores (all in nats, for the continuation tokens only; the context is given):
- ARM twin ("ar"): exact -log p = -sum_i log softmax(logits at i-1)[x_i] over the continuation.
- MDM "elbo": the Monte Carlo ELBO of DESIGN §4 / paper Eq. 4, the same estimator as
  `diffusion.elbo_nll`: the context stays clean, continuation tokens are masked with probability t_k,
  t stratified (t_k = (k + 1 - u)/n), NLL ~ mean_k sum_masked CE / t_k, with its standard error. It is an
  upper bound on the model's NLL (in expectation). Draws are keyed by (seed, sample k, row id); the row id of
  a pair defaults to a hash of its context tokens, so (a) a pair's score does not depend on the batch size,
  the order of the pairs or the other pairs, and (b) the choices of one question share t and the mask of
  each position (common random numbers: their difference has less noise than each score).
  `estimator="count"` (`--estimator count`): LLaDA's estimator of the same ELBO, exactly ceil(t_k T) of the T
  continuation tokens masked (the smallest draws) and weighed by T over that count; finite variance, where the
  default's 1/t_k weight gives an infinite one and a standard error that understates its spread. Its choices
  share t and the draws; their masks are the same only for continuations of one length (else nested sets of
  the smallest draws, still well correlated).
- MDM "chain": the chain rule over the continuation in a fixed order pi (default left to right):
  -log p_pi = -sum_s log p(x_{pi_s} | context, x_{pi_<s}, the rest masked): the exact NLL of the sampler that
  reveals one token per step in that order (T forward rows for T tokens, no Monte Carlo error). Averaged
  over all T! orders it equals the ELBO exactly (`diffusion.elbo_exact`; tested).
- CFG (MDM only, weight w >= 0): the same formulas evaluated with the guided denoiser of paper Eq. 7: at every
  predicted position the CE is taken under softmax(u + (w + 1)(c - u)), where c are the logits of the input
  (context clean) and u those of the same input (the same masks) with every context position replaced by the
  mask token. w = 0 runs no unconditional rows and is exactly the unguided score. With w > 0 the result is a
  guided score (what SMDM/LLaDA compare across choices), not a bound on a normalised likelihood.

Batching: ragged rows are right-padded and the pads hidden with `key_valid`; rows are padded and head rows
aligned exactly as in `smdm.sampling` ("Batch invariance"), so on CPU a pair's score is bit-identical for any
batch size and order. Every distinct model row runs once: candidates of one context share each row whose
differing positions are all masked (the chain rule's first step, ELBO samples that mask the whole
continuation), so ranking N candidates costs far fewer than N times one.

Multiple-choice JSONL (`smdm eval mc`), one question per line:
    {"context": "The capital of France is", "choices": [" Paris", " Rome"], "label": 0}
Context and choice are tokenized like lm-eval: trailing whitespace of the context moves to the choice, the
continuation is encode(context + choice) after the tokens of encode(context) (separate encoding if that is not
a prefix); an empty context becomes [EOS]. Metrics (lm-eval's names): acc = argmin total NLL; acc_norm =
argmin NLL / characters of the choice string (lm-eval's acc_norm); acc_bytes = NLL / UTF-8 bytes;
acc_token = NLL / tokens. Each with the standard error of a mean of 0/1 outcomes, sqrt(p(1-p)/(n-1))
(lm-eval's formula). Other fields on a line are ignored.

GSM8K (`smdm eval gsm8k`): {"question", "answer"} lines with the reference ending in "#### <number>".
Prompt: K worked examples (the first K lines of the train file, calculator notes <<...>> removed) as
"Question: q\nAnswer: a\n\n", then "Question: q\nAnswer:". The generation is cut at the next "Question:";
its answer is the number after the last "####", else the last number in the text (commas, "$" and a trailing
".0" dropped); correct iff it equals the reference number.

Perplexity (`smdm eval ppl`): the same windows of L + 1 tokens for both models (reader order, no shuffle);
both predict tokens 1..L given token 0 (the ARM exactly, the MDM by its ELBO with token 0 as the clean
context); document masking inside windows as in training (`--no-doc-mask` turns it off). Reported: NLL per
token, its Monte Carlo standard error (MDM; the ARM's is exact) and exp(NLL per token); one record per window
(its reader index, tokens scored, NLL and, for the MDM, its standard error). The default L is the length the
checkpoints were trained at (`_trained_seq_len`; the shortest of several, so that every model scores the same
windows): a longer window measures length extrapolation, not the model. The data must have the model's
vocab_size (another tokenizer's ids mean other tokens); a differing tokenizer hash with equal sizes is a note.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import math
import numbers
import re
import sys
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from smdm.cli import positive_int, set_threads
from smdm.config import ELBO_ESTIMATORS, check_estimator

METHODS = ("ar", "elbo", "chain")
ORDERS = ("l2r", "r2l")
N_SAMPLES = 128  # the CLI's --n-samples default (Monte Carlo samples of the MDM's ELBO)


class EvalDataError(ValueError):
    """A malformed evaluation file: the message names the file, the line and the field."""


# ------------------------------------------------------------------------------------------------------------
# Conditional log-likelihood of (context, continuation) pairs


@dataclass
class Scores:
    """-log p(continuation | context) per pair, in nats (see the module docstring for each method)."""

    nll: np.ndarray  # (N,) float64: ARM / chain exact; elbo: Monte Carlo estimate of the negative ELBO
    stderr: np.ndarray  # (N,) float64: Monte Carlo standard error (0 for the exact methods). Each pair's alone:
    # the pairs share their t_k (common random numbers: differences between candidates have less noise), so the
    # root of summed squared stderrs understates the error of a sum over pairs (for sums, `diffusion.elbo_nll`
    # gives the per-sample estimates and `diffusion.sum_stderr` their error)
    n_tokens: np.ndarray  # (N,) int64: continuation tokens (nll / n_tokens is nats per token)
    method: str  # "ar" | "elbo" | "chain"
    n_samples: int  # Monte Carlo samples per pair (elbo), else 0
    cfg: float = 0.0  # guidance weight w (MDM)
    estimator: Optional[str] = None  # elbo: "time" | "count" (`diffusion.elbo_nll`), else None
    # (N,) bool, "ar" and "chain" only (None for elbo): every continuation token is the argmax of the (guided)
    # logits of its own step (ARM: given its prefix; chain: in the fixed order, the rest masked). Computed in
    # the same forward passes as the score (lm-eval's is_greedy).
    greedy: Optional[np.ndarray] = None


@dataclass
class _Item:
    """One scored sequence: all its ids and the positions whose tokens are scored given the others."""

    ids: list  # token ids of the whole sequence
    pos: list  # target positions, in the caller's order (`order` indexes this list)
    given: list  # every other position, ascending (the "prompt" of CFG)
    start: Optional[int]  # positions are exactly [start, len(ids)) (a continuation after a context), else None


def _item(ids: list, pos: list) -> _Item:
    target = set(pos)
    given = [j for j in range(len(ids)) if j not in target]
    start = len(given) if len(given) == 0 or given[-1] == len(given) - 1 else None  # a suffix?
    return _Item(ids, pos, given, start)


@dataclass
class _Unit:
    """One model row: its input, the positions whose CE counts and their targets, where the sum goes."""

    item: int
    slot: int  # sample index k (elbo), else 0
    ids: np.ndarray  # (L,) int64 input (mask ids where masked)
    given: np.ndarray  # (G,) int64 positions given (never scored): masked in the unconditional (CFG) row
    pos: np.ndarray  # (P,) int64 positions whose CE counts
    tok: np.ndarray  # (P,) int64 their target ids


def context_row_id(context: Sequence[int]) -> int:
    """Default Monte Carlo row key of a pair: the first 8 bytes of blake2b over its context ids (int64).
    Choices of one question share it (common random numbers); it does not depend on the pair's index.
    `score_positions` keys an item by its given tokens in position order (for a suffix: the context)."""
    data = np.asarray(list(context), dtype=np.int64).tobytes()
    return int.from_bytes(hashlib.blake2b(b"smdm-eval" + data, digest_size=8).digest(), "little")


def _check_tokens(conf, what: str, ids: list, method: str) -> None:
    limit = conf.max_seq_len + (1 if method == "ar" else 0)  # the ARM never feeds the last token
    if ids and (min(ids) < 0 or max(ids) >= conf.vocab_size):
        bad = next(t for t in ids if not 0 <= t < conf.vocab_size)
        raise ValueError(f"{what} holds token id {bad} outside [0, {conf.vocab_size})")
    if len(ids) > limit:
        raise ValueError(f"{what} has {len(ids)} tokens, more than the model's context of {conf.max_seq_len}")


def _check_pairs(conf, pairs, method) -> list:
    from smdm.sampling import token_ids

    out = []
    for i, pair in enumerate(pairs):
        try:
            ctx, cont = pair
        except (TypeError, ValueError):
            raise ValueError(f"pair {i} is not a (context, continuation) pair of token-id lists") from None
        ctx, cont = token_ids(ctx, f"pair {i}'s context"), token_ids(cont, f"pair {i}'s continuation")
        if not cont:
            raise ValueError(f"pair {i}: the continuation is empty (nothing to score)")
        if method == "ar" and not ctx:
            raise ValueError(f"pair {i}: the ARM needs at least one context token to predict the first "
                             "continuation token (e.g. an EOS/BOS id)")
        _check_tokens(conf, f"pair {i}", ctx + cont, method)
        out.append(_item(ctx + cont, list(range(len(ctx), len(ctx) + len(cont)))))
    return out


def _check_items(conf, items, method) -> list:
    from smdm.sampling import token_ids

    out = []
    for i, it in enumerate(items):
        try:
            ids, pos = it
            if not all(hasattr(x, "__iter__") for x in (ids, pos)):
                raise TypeError
        except (TypeError, ValueError):
            raise ValueError(f"item {i} is not an (ids, positions) pair of integer lists") from None
        ids, pos = token_ids(ids, f"item {i}'s ids"), token_ids(pos, f"item {i}'s positions", "positions")
        if not pos:
            raise ValueError(f"item {i}: no positions (nothing to score)")
        bad = [p for p in pos if not 0 <= p < len(ids)]
        if bad:
            raise ValueError(f"item {i}: position {bad[0]} is out of range for a sequence of {len(ids)} tokens")
        if len(set(pos)) != len(pos):
            dup = next(p for p in pos if pos.count(p) > 1)
            raise ValueError(f"item {i}: position {dup} is listed twice")
        _check_tokens(conf, f"item {i}", ids, method)
        item = _item(ids, pos)
        if method == "ar" and not (item.start and item.start >= 1):
            raise ValueError(f"item {i}: the ARM twin scores only a suffix after at least one given token "
                             f"(positions [s, {len(ids)}), s >= 1), got positions {pos}; score other positions "
                             "with the MDM")
        out.append(item)
    return out


def _check_options(conf, method, cfg, n_samples, batch_size, estimator="time") -> str:
    method = method or ("ar" if conf.causal else "elbo")
    check_estimator(estimator)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if (method == "ar") != bool(conf.causal):
        raise ValueError(f"method {method!r} does not apply to this model "
                         f"({'the ARM twin: use method=ar' if conf.causal else 'an MDM: use elbo or chain'})")
    if not (cfg >= 0 and math.isfinite(cfg)):
        raise ValueError(f"cfg must be finite and >= 0 (0 = no guidance), got {cfg}")
    if cfg and conf.causal:
        raise ValueError("cfg applies to the MDM only (the ARM twin has no mask token)")
    if method == "elbo" and (isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral)):
        raise ValueError(f"n_samples must be an int, got {n_samples!r}")
    if method == "elbo" and n_samples < 2:
        raise ValueError(f"n_samples must be >= 2 for a standard error, got {n_samples}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return method


def score(model, pairs: Sequence, *, method: Optional[str] = None, n_samples: int = 128, seed: int = 0,
          cfg: float = 0.0, order="l2r", batch_size: int = 64, row_ids: Optional[Sequence[int]] = None,
          batch_invariant: bool = True, estimator: str = "time") -> Scores:
    """-log p(continuation | context) of each (context ids, continuation ids) pair (module docstring).

    method: "ar" (the causal twin; the default for it), "elbo" (the MDM's default) or "chain" (MDM).
    n_samples: Monte Carlo samples per pair for "elbo" (SMDM: 128 for validation, up to 1024 for
      benchmarks); samples whose mask is empty contribute exactly 0 and run no forward pass.
    estimator ("elbo"): "time" (mask each target with probability t_k, weigh by 1/t_k: DESIGN §4, the paper's)
      or "count" (mask exactly ceil(t_k T) of the T targets, weigh by T over that count: LLaDA's). The same
      expectation; "time" has an infinite variance (heavy tail, a standard error that understates the
      spread), "count" a finite one (`diffusion.elbo_nll`). Ignored by "ar" and "chain".
    cfg: unsupervised CFG weight w (MDM only; 0 = off). order ("chain"): "l2r", "r2l", or one permutation of
      range(len(continuation)) per pair (position s of the list is revealed at step s).
    batch_size: model rows per forward pass (a CFG row pair counts two). row_ids: Monte Carlo keys per pair
      (default `context_row_id`). batch_invariant: pad as `smdm.sampling` does so that results are
      bit-identical across batch layouts on CPU (False: a little faster).
    The same numbers as `score_positions` over (context + continuation, the continuation's positions)."""
    method = _check_options(model.config, method, cfg, n_samples, batch_size, estimator)
    items = _check_pairs(model.config, pairs, method)
    return _score_items(model, items, method=method, n_samples=n_samples, seed=seed, cfg=cfg, order=order,
                        batch_size=batch_size, row_ids=row_ids, batch_invariant=batch_invariant, what="pair",
                        estimator=estimator)


def score_positions(model, items: Sequence, *, method: Optional[str] = None, n_samples: int = 128,
                    seed: int = 0, cfg: float = 0.0, order="l2r", batch_size: int = 64,
                    row_ids: Optional[Sequence[int]] = None, batch_invariant: bool = True,
                    estimator: str = "time") -> Scores:
    """-log p(x[positions] | x[every other position]) of each (ids, positions) item: the likelihood of any
    set of positions (infilling: a middle span, a name before its description, ...) given the rest.

    The MDM's estimators of `score` with the target positions in place of the continuation: "elbo" masks
    only target positions (the same stratified times and `diffusion.elbo_masks` draws), "chain" reveals the
    targets one per step in a fixed order, everything else given. order: "l2r" (ascending position, the
    default), "r2l", or one permutation of range(len(positions)) per item whose entry s is the index into that
    item's `positions` revealed at step s. CFG (paper Eq. 7): the unconditional row masks every given (non-
    target) position. The ARM twin ("ar") scores a suffix only (positions [s, len(ids)), s >= 1): exactly
    `score` of (ids[:s], ids[s:]); other positions raise ValueError. row_ids default: `context_row_id` of the
    given tokens in position order, so for a suffix every number equals `score`'s bit for bit. Errors name
    the item's index. Other arguments as in `score`."""
    method = _check_options(model.config, method, cfg, n_samples, batch_size, estimator)
    items = _check_items(model.config, items, method)
    return _score_items(model, items, method=method, n_samples=n_samples, seed=seed, cfg=cfg, order=order,
                        batch_size=batch_size, row_ids=row_ids, batch_invariant=batch_invariant, what="item",
                        estimator=estimator)


def _score_items(model, items: list, *, method, n_samples, seed, cfg, order, batch_size, row_ids,
                 batch_invariant, what, estimator="time") -> Scores:
    import torch

    conf = model.config
    N = len(items)
    if row_ids is None:
        row_ids = [context_row_id([it.ids[j] for j in it.given]) for it in items]
    elif len(row_ids) != N:
        raise ValueError(f"row_ids has {len(row_ids)} entries for {N} {what}s")
    n_tokens = np.array([len(it.pos) for it in items], dtype=np.int64)
    # longest first (fewer pads); items of one context together (their units share rows: `_run_units`)
    by_length = sorted(range(N), key=lambda i: (-len(items[i].ids), row_ids[i], i))
    from smdm.diffusion import elbo_times

    t = elbo_times(n_samples, seed) if method == "elbo" else None
    sums = np.zeros((N, n_samples if method == "elbo" else 1), dtype=np.float64)
    greedy = np.ones(N, dtype=bool)
    if method == "elbo":
        units = _elbo_units(items, by_length, t, seed, row_ids, conf.mask_id, estimator)
    elif method == "chain":
        units = _chain_units(items, by_length, _orders(order, items, what), conf.mask_id)
    else:
        units = _ar_units(items, by_length)
    with torch.no_grad():
        for unit, (ce, argmax) in _run_units(model, units, cfg, batch_size, batch_invariant):
            sums[unit.item, unit.slot] += ce
            greedy[unit.item] &= argmax
    if method == "elbo":
        if estimator == "count":  # (N, n): sum_masked CE * T_i / l_ik
            from smdm.diffusion import elbo_count_weights

            per_sample = sums * elbo_count_weights(t, n_tokens).T
        else:
            per_sample = sums / t[None, :]  # (N, n): sum_masked CE / t_k, exactly zero for empty masks
        nll = per_sample.mean(1)
        stderr = per_sample.std(1, ddof=1) / math.sqrt(n_samples)
    else:
        nll, stderr = sums[:, 0], np.zeros(N)
    return Scores(nll=nll, stderr=stderr, n_tokens=n_tokens, method=method,
                  n_samples=n_samples if method == "elbo" else 0, cfg=float(cfg),
                  greedy=None if method == "elbo" else greedy, estimator=estimator if method == "elbo" else None)


def _orders(order, items, what) -> list:
    """Per item the target positions in reveal order ("l2r": ascending position)."""
    if isinstance(order, str):
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS} or one permutation per {what}, got {order!r}")
        return [sorted(it.pos, reverse=order == "r2l") for it in items]
    orders = [list(map(int, o)) for o in order]
    if len(orders) != len(items):
        raise ValueError(f"order has {len(orders)} permutations for {len(items)} {what}s")
    for i, (o, it) in enumerate(zip(orders, items)):
        if sorted(o) != list(range(len(it.pos))):
            raise ValueError(f"order[{i}] = {o} is not a permutation of range({len(it.pos)})")
    return [[it.pos[j] for j in o] for o, it in zip(orders, items)]


def _elbo_units(items, by_length, t, seed, row_ids, mask_id, estimator="time") -> Iterator[_Unit]:
    """Sample k of item i: the target positions `diffusion.elbo_masks` masks for (seed, k, row id) ("time":
    those whose draw is < t_k; "count": the ceil(t_k T) with the smallest draws); every masked token is
    predicted."""
    import torch

    from smdm.diffusion import elbo_masks

    n = len(t)
    for i in by_length:
        it = items[i]
        L = len(it.ids)
        x0 = np.array(it.ids, dtype=np.int64)
        given = np.array(it.given, dtype=np.int64)
        target = torch.zeros(1, L, dtype=torch.bool)
        target[0, it.pos] = True
        masks = elbo_masks(1, L, n, 0, n, seed, [row_ids[i]], t, target, estimator=estimator)[:, 0].numpy()
        for k in range(n):
            pos = np.flatnonzero(masks[k])
            if len(pos):  # an empty mask adds exactly 0: no forward pass
                yield _Unit(i, k, np.where(masks[k], mask_id, x0), given, pos, x0[pos])


def _chain_units(items, by_length, orders, mask_id) -> Iterator[_Unit]:
    """Step s of item i: target positions order[s:] masked, predict order[s]."""
    for i in by_length:
        x0 = np.array(items[i].ids, dtype=np.int64)
        given = np.array(items[i].given, dtype=np.int64)
        order = np.array(orders[i], dtype=np.int64)
        for s in range(len(order)):
            x = x0.copy()
            x[order[s:]] = mask_id
            yield _Unit(i, 0, x, given, order[s:s + 1], x0[order[s:s + 1]])


def _ar_units(items, by_length) -> Iterator[_Unit]:
    """Input = the sequence without its last token; position j predicts token j + 1 (targets: a suffix)."""
    for i in by_length:
        x0 = np.array(items[i].ids, dtype=np.int64)
        start = items[i].start
        pos = np.arange(start - 1, len(x0) - 1)
        yield _Unit(i, 0, x0[:-1], np.arange(start), pos, x0[pos + 1])


WINDOW_TOKENS = 1 << 21  # input tokens of the units deduplicated together (~16 MB of int64 ids)


@dataclass
class _Row:
    """One distinct model input (plus its unconditional twin with CFG) and the union of the positions its
    units score."""

    ids: np.ndarray
    given: np.ndarray
    cols: dict  # position -> index into `pos`
    pos: list
    index: int  # among the window's distinct rows


def _run_units(model, units: Iterable[_Unit], cfg: float, batch_size: int, batch_invariant: bool):
    """Yield (unit, (sum of its CE, whether each of its targets is the argmax)) for every unit. Units are taken
    in windows of about WINDOW_TOKENS input tokens; inside a window every distinct input row (with CFG: the
    row and its given positions) runs once, with `batch_size` model rows per forward pass (CFG: two per
    distinct row), and serves every unit that shares it (the candidates of one context share every row
    whose differing positions are all masked). The numbers are those of running each unit alone (bit for
    bit on CPU: the logits of a position do not depend on the other rows or positions of its pass)."""
    window, size = [], 0
    for u in units:
        window.append(u)
        size += len(u.ids)
        if size >= WINDOW_TOKENS:
            yield from _run_window(model, window, cfg, batch_size, batch_invariant)
            window, size = [], 0
    if window:
        yield from _run_window(model, window, cfg, batch_size, batch_invariant)


def _run_window(model, window: list, cfg: float, batch_size: int, batch_invariant: bool):
    import torch

    rows, base, flat = {}, [], []  # distinct rows by input; per unit its first index into `flat`
    for u in window:
        key = u.ids.tobytes() + (b"|" + u.given.tobytes() if cfg else b"")
        r = rows.get(key)
        if r is None:
            r = rows[key] = _Row(u.ids, u.given, {}, [], len(rows))
        base.append(len(flat))
        for p in u.pos.tolist():
            c = r.cols.get(p)
            if c is None:
                c = r.cols[p] = len(r.pos)
                r.pos.append(p)
            flat.append((r.index, c))
    distinct = list(rows.values())
    flat = np.array(flat, dtype=np.int64).reshape(-1, 2)  # (P, 2): distinct row, its position column
    offset = np.cumsum([0] + [len(r.pos) for r in distinct])  # first logits row of each distinct row
    where = offset[flat[:, 0]] + flat[:, 1]  # (P,) logits row of every unit position
    tok = np.concatenate([u.tok for u in window])
    by_row = np.argsort(flat[:, 0], kind="stable")  # unit positions grouped by distinct row
    row_sorted = flat[by_row, 0]
    ce, hit = np.empty(len(flat)), np.empty(len(flat), dtype=bool)
    per_pass = max(1, batch_size // (2 if cfg else 1))
    for a in range(0, len(distinct), per_pass):  # logits of one pass at a time: memory of one batch
        b = min(a + per_pass, len(distinct))
        lp, am = _log_probs(model, distinct[a:b], cfg, batch_invariant)  # (positions of rows a..b, V)
        sel = by_row[np.searchsorted(row_sorted, a):np.searchsorted(row_sorted, b)]
        i, t = torch.from_numpy(where[sel] - offset[a]), torch.from_numpy(tok[sel])
        ce[sel] = (-lp[i, t]).double().numpy()
        hit[sel] = (am[i] == t).numpy()
    starts = np.array(base, dtype=np.int64)
    sums = np.add.reduceat(ce, starts)  # per unit (every unit has >= 1 position)
    hits = np.logical_and.reduceat(hit, starts)
    for u, c, h in zip(window, sums.tolist(), hits.tolist()):
        yield u, (c, h)


def _log_probs(model, batch: list, cfg: float, batch_invariant: bool) -> tuple:
    """One padded forward pass over the distinct rows (plus their unconditional rows with CFG): the float32
    log-softmax of the (guided) logits at the rows' positions, row after row, on the CPU (P, V), and their
    argmax (P,) (first index on ties, as torch.argmax). -log_softmax(x)[target] is exactly
    F.cross_entropy(x, target)."""
    import torch
    import torch.nn.functional as F

    from smdm.sampling import guided_logits, logits_at

    conf = model.config
    seqs = [torch.from_numpy(r.ids) for r in batch]
    if cfg:  # paper Eq. 7: the unconditional row has every given (context) position masked
        seqs += [x.clone().index_fill_(0, torch.from_numpy(r.given), conf.mask_id) for x, r in zip(seqs, batch)]
    sizes = [len(r.pos) for r in batch]
    row = torch.repeat_interleave(torch.arange(len(batch)), torch.tensor(sizes))  # (P,) row of each position
    pos = torch.tensor([p for r in batch for p in r.pos])  # (P,)
    if cfg:  # the unconditional rows follow the conditional ones
        row, pos = torch.cat([row, row + len(batch)]), torch.cat([pos, pos])
    logits = logits_at(model, seqs, row, pos, batch_invariant=batch_invariant)  # (P or 2P, V)
    m = sum(sizes)
    guided = guided_logits(logits[:m], logits[m:] if cfg else None, cfg)  # float32
    return F.log_softmax(guided, -1).cpu(), guided.argmax(-1).cpu()


# ------------------------------------------------------------------------------------------------------------
# Reading evaluation files


def jsonl_objects(path, error=None, data: bytes | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSONL file, read as bytes and cut at "\n" only:
    U+2028, U+2029 and U+0085 are legal inside JSON strings, and `str.splitlines` cut lines there. Each line
    is decoded on its own, so an error names its very line (and byte offset); `error` is the exception class
    (default EvalDataError; `smdm.sft` passes its SftDataError). `data`: the file's bytes, already read (a
    pipe can be read once), with `path` naming them in messages."""
    error = error or EvalDataError
    path = Path(path)
    try:
        f = open(path, "rb") if data is None else io.BytesIO(data)
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a JSONL file") from None
    offset = 0
    with f:
        for no, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise error(f"{path}:{no}: not UTF-8 text ({e.reason} at byte {start + e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{no}: not valid JSON ({e.msg} at column {e.colno})") from None
            except (ValueError, RecursionError) as e:  # an integer of > 4300 digits, arrays nested too deep
                raise error(f"{path}:{no}: JSON that Python cannot read ({e})") from None
            if not isinstance(obj, dict):
                raise error(f"{path}:{no}: expected a JSON object, got {type(obj).__name__}")
            yield no, obj


_read_jsonl = jsonl_objects


def _field(path, no, obj, name, kind, what):
    if name not in obj:
        raise EvalDataError(f"{path}:{no}: missing field {name!r} ({what})")
    v = obj[name]
    if not isinstance(v, kind) or isinstance(v, bool):
        raise EvalDataError(f"{path}:{no}: field {name!r} must be {what}, got {json.dumps(v)[:60]}")
    return v


@dataclass
class McItem:
    context: str
    choices: list
    label: int
    line: int  # line number in the file (1-based)
    source: Optional[str] = None  # the file it was read from (errors say FILE:LINE), None when built by hand


def _where(it) -> str:
    """'FILE:LINE' of an item read from a file (as every data error names it), else 'line LINE'."""
    return f"{it.source}:{it.line}" if it.source is not None else f"line {it.line}"


def read_mc(path, limit: Optional[int] = None) -> list:
    """Multiple-choice questions from JSONL (module docstring); errors name file, line and field."""
    items = []
    for no, obj in _read_jsonl(path):
        if limit is not None and len(items) >= limit:
            break
        ctx = _field(path, no, obj, "context", str, "a string")
        choices = _field(path, no, obj, "choices", list, "a list of at least 2 strings")
        if len(choices) < 2:
            raise EvalDataError(f"{path}:{no}: field 'choices' must be a list of at least 2 strings, "
                                f"got {len(choices)}")
        for j, c in enumerate(choices):
            if not isinstance(c, str) or not c:
                raise EvalDataError(f"{path}:{no}: field 'choices'[{j}] must be a non-empty string, "
                                    f"got {json.dumps(c)[:60]}")
        label = _field(path, no, obj, "label", int, "an integer index into 'choices'")
        if not 0 <= label < len(choices):
            raise EvalDataError(f"{path}:{no}: field 'label' = {label} is outside [0, {len(choices)})")
        items.append(McItem(ctx, choices, label, no, str(path)))
    if not items:
        raise EvalDataError(f"{path}: no questions (empty file)")
    return items


@dataclass
class Gsm8kItem:
    question: str
    answer: str  # the reference solution, ending in "#### <number>"
    gold: str  # the normalised reference number
    line: int
    source: Optional[str] = None  # the file it was read from (errors say FILE:LINE), None when built by hand


def read_gsm8k(path, limit: Optional[int] = None) -> list:
    """GSM8K-style JSONL: {"question": str, "answer": str ending in "#### <number>"}."""
    items = []
    for no, obj in _read_jsonl(path):
        if limit is not None and len(items) >= limit:
            break
        q = _field(path, no, obj, "question", str, "a string")
        a = _field(path, no, obj, "answer", str, "a string ending in '#### <number>'")
        gold = reference_answer(a)
        if gold is None:
            raise EvalDataError(f"{path}:{no}: field 'answer' has no final '#### <number>'")
        items.append(Gsm8kItem(q, a, gold, no, str(path)))
    if not items:
        raise EvalDataError(f"{path}: no questions (empty file)")
    return items


# ------------------------------------------------------------------------------------------------------------
# Multiple choice


def encode_pair(tokenizer, context: str, continuation: str) -> tuple:
    """lm-eval's split: trailing whitespace of the context goes to the continuation; the continuation's ids are
    those of encode(context + continuation) after encode(context) (separate encoding if not a prefix)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
    ctx, whole = enc(context), enc(context + continuation)
    cont = whole[len(ctx):] if whole[:len(ctx)] == ctx and len(whole) > len(ctx) else enc(continuation)
    return ctx, cont


def mean_stderr(x) -> Optional[float]:
    """Standard error of a mean (sample std, ddof 1): lm-eval's formula; sqrt(p(1-p)/(n-1)) for 0/1 outcomes.
    None for fewer than 2 items."""
    x = np.asarray(x, dtype=np.float64)
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None


def encode_mc_item(tokenizer, it: McItem, eos_id: Optional[int]) -> tuple:
    """(context ids, [choice ids, ...]) of a question, split as `encode_pair` splits them (the context's ids do
    not depend on the choice). An empty context is EOS (as lm-eval does), the same for both models."""
    enc = [encode_pair(tokenizer, it.context, c) for c in it.choices]
    ctx = enc[0][0]
    if not ctx:
        if eos_id is None:
            raise ValueError(f"{_where(it)}: empty context and no EOS id to stand for it")
        ctx = [eos_id]
    for j, (_, cont) in enumerate(enc):
        if not cont:
            raise ValueError(f"{_where(it)}: choice {j} encodes to no tokens")
    return ctx, [cont for _, cont in enc]


def evaluate_mc(model, tokenizer, items: Sequence[McItem], *, eos_id: Optional[int] = None, **score_kw) -> dict:
    """Accuracy of `model` on multiple-choice items (acc, acc_norm, acc_bytes, acc_token with standard errors)
    and one record per item. `score_kw` go to `score` (method, n_samples, seed, cfg, batch_size)."""
    pairs, index, lengths = [], [], []
    for q, it in enumerate(items):
        ctx, conts = encode_mc_item(tokenizer, it, eos_id)
        for j, (choice, cont) in enumerate(zip(it.choices, conts)):
            # checked here so that the error names the line and choice (score() only knows its pair index)
            _check_tokens(model.config, f"{_where(it)}: context + choice {j}", ctx + cont,
                          "ar" if model.config.causal else "elbo")
            pairs.append((ctx, cont))
            index.append((q, j))
            lengths.append((len(choice), len(choice.encode("utf-8"))))
    s = score(model, pairs, **score_kw)
    records, a = [], 0
    for q, it in enumerate(items):
        k = len(it.choices)
        nll, se, nt = s.nll[a:a + k], s.stderr[a:a + k], s.n_tokens[a:a + k]
        chars = np.array([c for c, _ in lengths[a:a + k]], dtype=np.float64)
        nbytes = np.array([b for _, b in lengths[a:a + k]], dtype=np.float64)
        preds = {"pred": int(np.argmin(nll)), "pred_norm": int(np.argmin(nll / chars)),
                 "pred_byte": int(np.argmin(nll / nbytes)), "pred_token": int(np.argmin(nll / nt))}
        records.append({"index": q, "line": it.line, "label": it.label, **preds, "nll": nll.tolist(),
                        "stderr": se.tolist(), "n_tokens": nt.tolist(), "n_chars": chars.astype(int).tolist(),
                        "n_bytes": nbytes.astype(int).tolist()})
        a += k
    out = {"task": "mc", "n": len(items), "method": s.method, "n_samples": s.n_samples, "cfg": s.cfg}
    if s.estimator:
        out["estimator"] = s.estimator
    for metric, key in (("acc", "pred"), ("acc_norm", "pred_norm"), ("acc_bytes", "pred_byte"),
                        ("acc_token", "pred_token")):
        hits = [float(r[key] == r["label"]) for r in records]
        out[metric], out[metric + "_stderr"] = float(np.mean(hits)), mean_stderr(hits)
    out["records"] = records
    return out


# ------------------------------------------------------------------------------------------------------------
# GSM8K

_STRICT = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?\$?\d(?:[\d,]*\d)?(?:\.\d+)?|-?\$?\.\d+")
_CALC = re.compile(r"<<[^>]*>>")


def strip_calculator(answer: str) -> str:
    """A GSM8K answer without its <<expr=value>> calculator annotations (how prompts show worked answers)."""
    return _CALC.sub("", answer)


def normalize_number(s: str) -> Optional[str]:
    """'$1,234.50' -> '1234.5', '18.00' -> '18', '-3' -> '-3'; None when it is not a number."""
    s = s.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == 0:
        return "0"  # also -0
    # exact digits: no int() (a generation that repeats a digit token can hold a number past Python's 4300-digit
    # limit) and no normalize() (it rounds to the context's 28 digits)
    t = format(d, "f")
    return t.rstrip("0").rstrip(".") if "." in t else t


def reference_answer(answer: str) -> Optional[str]:
    """The number after the last '####' of a GSM8K reference solution, normalised (None if absent)."""
    found = _STRICT.findall(answer)
    return normalize_number(found[-1]) if found else None


def extract_answer(text: str) -> Optional[str]:
    """The answer of a generation: the number after the last '####', else the last number in the text
    (commas and '$' dropped), normalised; None when the text holds no number."""
    strict = reference_answer(text)
    if strict is not None:
        return strict
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def gsm8k_prompt(question: str, shots: Sequence[Gsm8kItem] = ()) -> str:
    """K worked examples then the question (module docstring)."""
    parts = [f"Question: {s.question}\nAnswer: {strip_calculator(s.answer)}\n\n" for s in shots]
    return "".join(parts) + f"Question: {question}\nAnswer:"


def cut_generation(text: str) -> str:
    """The generation up to the next question the model starts on its own."""
    return text.split("Question:")[0].strip()


def evaluate_gsm8k(model, tokenizer, items: Sequence[Gsm8kItem], *, shots: Sequence[Gsm8kItem] = (),
                   gen_length: int = 256, steps: Optional[int] = None, sampler: str = "low_confidence",
                   block_length: Optional[int] = None, cfg: float = 0.0, batch_size: int = 8, seed: int = 0,
                   eos_id: Optional[int] = None, progress: Optional[Callable] = None,
                   threshold: Optional[float] = None, schedule: Optional[str] = None) -> dict:
    """Generation accuracy: greedy generation (`smdm.sampling.generate`; the ARM twin decodes left to right
    with its KV cache, the sampler options apply to the MDM only), answer extraction, exact match. `schedule`
    is the MDM sampler's (default, as `smdm.generate`'s: the checkpoint's training schedule, else linear).
    The result's "steps" is the step budget the sampler was given (None for the ARM and for the threshold
    sampler, whose step count is adaptive and ignores `steps`); "mean_steps" the sampler steps a question took
    (MDM), "forward_passes" the model calls of the whole run."""
    from smdm import sampling

    causal = model.config.causal
    if causal and cfg:
        raise ValueError("cfg applies to the MDM only (the ARM twin has no mask token)")
    prompts = [tokenizer.encode(gsm8k_prompt(it.question, shots), add_special_tokens=False).ids
               for it in items]
    for it, p in zip(items, prompts):  # here, so that the error names the line (generate's, the batch index)
        if len(p) + gen_length > model.config.max_seq_len:
            raise ValueError(f"{_where(it)}: the prompt ({len(shots)}-shot) has {len(p)} tokens; with "
                             f"gen_length={gen_length} that is {len(p) + gen_length} > the model's context of "
                             f"{model.config.max_seq_len}")
    kw = dict(gen_length=gen_length, eos_id=eos_id, seed=seed, temperature=0.0)
    if not causal:
        kw.update(steps=steps or gen_length, sampler=sampler, block_length=block_length, cfg_scale=cfg,
                  threshold=threshold, schedule=schedule)
    records, generated, forwards, row_steps = [], 0, 0, []
    t0 = time.perf_counter()
    for a in range(0, len(items), batch_size):
        out = sampling.generate(model, prompts[a:a + batch_size], **kw)
        generated += out.generated_tokens
        forwards += out.forward_passes
        row_steps += out.steps
        for it, toks in zip(items[a:a + batch_size], out.tokens):
            text = cut_generation(tokenizer.decode(toks, skip_special_tokens=True))
            pred = extract_answer(text)
            records.append({"index": len(records), "line": it.line, "gold": it.gold, "pred": pred,
                            "correct": pred == it.gold, "generation": text})
        if progress:
            progress(len(records), len(items))
    hits = [float(r["correct"]) for r in records]
    return {"task": "gsm8k", "n": len(items), "few_shot": len(shots), "gen_length": gen_length,
            "steps": None if causal or sampler == "threshold" else (steps or gen_length),
            "mean_steps": None if causal or not row_steps else float(np.mean(row_steps)),
            "sampler": None if causal else sampler,
            "threshold": None if causal else threshold, "schedule": None if causal else schedule, "cfg": cfg,
            "acc": float(np.mean(hits)), "acc_stderr": mean_stderr(hits),
            "generated_tokens": generated, "forward_passes": forwards,
            "seconds": round(time.perf_counter() - t0, 3), "records": records}


# ------------------------------------------------------------------------------------------------------------
# Perplexity on shards


def evaluate_ppl(model, data, *, seq_len: int, limit: Optional[int] = None, n_samples: int = 128,
                 seed: int = 0, batch_size: int = 8, doc_mask: bool = True, split: str = "val",
                 estimator: str = "time", name: str = "the model") -> dict:
    """NLL per token of tokens 1..L of each window of L + 1 tokens given token 0 (module docstring), and one
    record per window. `name` stands for the model in errors (the CLI: "--ckpt DIR")."""
    import torch

    from smdm.data import PackedDataset
    from smdm.diffusion import elbo_nll, sum_stderr
    from smdm.linear_ce import cross_entropy_rows

    conf = model.config
    if seq_len + 1 > conf.max_seq_len + (1 if conf.causal else 0):
        raise ValueError(f"--seq-len {seq_len}: windows of {seq_len + 1} tokens exceed the model's context of "
                         f"{conf.max_seq_len}")
    ds = PackedDataset(data, seq_len, 1, extra_token=True, shuffle=False, epochs=1, split=split)
    # as `smdm train --init-from` refuses it: fewer ids are as wrong as more (id 5 is another token), more would
    # index past the embedding (or read as the MDM's mask id)
    if ds.manifest.vocab_size != conf.vocab_size:
        raise ValueError(f"{name} has vocab_size {conf.vocab_size}, the data has {ds.manifest.vocab_size} "
                         f"({ds.root}: another tokenizer?)")
    device = model.head.weight.device
    nll = 0.0
    totals, times = 0.0, None  # the MDM: per-sample sums over the windows (n,) and their times (sum_stderr)
    windows = 0
    records = []
    stream = iter(ds)
    with torch.no_grad():
        while limit is None or windows < limit:
            want = batch_size if limit is None else min(batch_size, limit - windows)
            got = list(itertools.islice(stream, want))
            if not got:
                break
            x = torch.cat([b["input_ids"] for b in got]).to(device)  # (B, L+1)
            seg = torch.cat([b["segment_ids"] for b in got]).to(device) if doc_mask else None
            index = torch.cat([b["index"] for b in got]).numpy()  # (B,) window ids
            if conf.causal:
                h = model.hidden(x[:, :-1], segment_ids=None if seg is None else seg[:, :-1])  # (B, L, d)
                # per-row CE in chunks of rows: never every position's logits at once (B·L·V floats)
                ce = cross_entropy_rows(h.reshape(-1, h.shape[-1]), model.head.weight, x[:, 1:].reshape(-1))
                row_nll, row_se = ce.double().view(len(x), -1).sum(1).cpu().numpy(), None  # (B,)
            else:  # row ids = window ids: the estimate of a window does not depend on the batching
                est = elbo_nll(model, x, prompt_lens=[1] * len(x), segment_ids=seg, n_samples=n_samples,
                               seed=seed, row_ids=index, max_rows=max(64, len(x)), estimator=estimator)
                row_nll, row_se = est.nll.double().cpu().numpy(), est.stderr.double().cpu().numpy()  # (B,)
                totals, times = totals + est.samples.sum(1), est.times  # one seed: the same t_k in every batch
            nll += float(row_nll.sum())
            for j, w in enumerate(index.tolist()):
                records.append({"window": w, "tokens": seq_len, "nll": float(row_nll[j]),
                                **({} if row_se is None else {"stderr": float(row_se[j])})})
            windows += len(x)
    tokens = windows * seq_len
    if tokens == 0:
        raise ValueError(f"{data}: no window of {seq_len + 1} tokens to evaluate")
    per_token = nll / tokens
    return {"task": "ppl", "windows": windows, "tokens": tokens, "seq_len": seq_len, "doc_mask": doc_mask,
            "method": "ar" if conf.causal else "elbo", "n_samples": 0 if conf.causal else n_samples,
            **({} if conf.causal else {"estimator": estimator}),
            "nll_per_token": per_token, "ppl": math.exp(per_token), "records": records,
            # the windows share their t_k: `sum_stderr` of the per-sample totals (summed squared stderrs
            # understated it, up to 2.3x over 64 windows: benches/elbo_sum_stderr.py)
            "stderr": 0.0 if conf.causal else sum_stderr(totals, times, stratified=True) / tokens}


# ------------------------------------------------------------------------------------------------------------
# Command line


def register(parser: argparse.ArgumentParser, name: str = "eval") -> None:
    """Add `smdm eval mc | gsm8k | ppl | harness` to `parser`."""
    parser.description = "Likelihood and generation benchmarks, MDM vs its ARM twin (smdm.evaluate)."
    sub = parser.add_subparsers(dest="task", required=True)

    def common(p, data_help):
        p.add_argument("--ckpt", action="append", required=True,
                       help="checkpoint (step dir or run dir); repeat to compare models on the same items")
        p.add_argument("--data", required=True, help=data_help)
        p.add_argument("--limit", type=int, default=None, help="evaluate the first N items / windows")
        p.add_argument("--batch-size", type=int, default=None, help="rows (or prompts) per forward pass")
        p.add_argument("--seed", type=int, default=0, help="Monte Carlo / sampler seed")
        p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
        p.add_argument("--threads", type=positive_int, default=None, help="CPU threads of torch and of the "
                       "Rust core (default: all; on a busy machine 1 can be much faster)")
        p.add_argument("--json", default=None, metavar="OUT", help="write all results (with per-item "
                       "records) to OUT, atomically")

    def estimator(p):
        p.add_argument("--estimator", default="time", choices=ELBO_ESTIMATORS,
                       help="MDM elbo: time (mask each token with probability t, weigh 1/t: the paper's; "
                       "infinite variance, its ± understates the spread) | count (mask ceil(t T) of the T "
                       "tokens, weigh T / count: LLaDA's, finite variance)")

    p = sub.add_parser("mc", help="multiple-choice accuracy from JSONL {context, choices, label}")
    common(p, 'JSONL, one {"context": str, "choices": [str, ...], "label": int} per line')
    p.add_argument("--n-samples", type=int, default=N_SAMPLES, help="Monte Carlo samples per choice (MDM elbo)")
    estimator(p)
    p.add_argument("--method", default=None, help="MDM: elbo (default) | chain (exact, left to right)")
    p.add_argument("--cfg", type=float, default=0.0, help="unsupervised CFG weight w (MDM; 0 = off)")

    p = sub.add_parser("gsm8k", help="GSM8K generation accuracy")
    common(p, "GSM8K JSONL {question, answer} (answers end in '#### <number>')")
    p.add_argument("--few-shot", type=int, default=0, help="worked examples in the prompt (default 0)")
    p.add_argument("--train", default=None, help="file of the worked examples (default: train.jsonl beside "
                   "--data)")
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--steps", type=int, default=None, help="MDM sampler steps (default: gen length)")
    p.add_argument("--sampler", default="low_confidence", help="MDM sampler (smdm.sampling.SAMPLERS)")
    p.add_argument("--threshold", type=float, default=None, help="confidence threshold of --sampler threshold")
    p.add_argument("--block-length", type=int, default=None, help="MDM semi-autoregressive block length")
    p.add_argument("--schedule", default=None, help="MDM sampler schedule: linear | cosine | polynomial:P "
                   "(default: the checkpoint's training schedule, else linear; as `smdm generate`)")
    p.add_argument("--cfg", type=float, default=0.0, help="unsupervised CFG weight w (MDM; 0 = off)")

    p = sub.add_parser("ppl", help="NLL per token on a shard directory, the same windows for every model")
    common(p, "prepared data dir (its --split) or a dataset dir with manifest.json")
    p.add_argument("--split", default="val", help="split of a prepared dir (default val)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="L: windows of L + 1 tokens (default: the windows the checkpoints were trained on, the "
                   "shortest of several; else min(512, the model's context - 1))")
    p.add_argument("--n-samples", type=int, default=N_SAMPLES, help="Monte Carlo samples per window (MDM)")
    estimator(p)
    p.add_argument("--no-doc-mask", dest="doc_mask", action="store_false",
                   help="attend across the documents packed in a window")

    from smdm.harness import add_arguments  # no lm_eval import until the command runs

    p = sub.add_parser("harness", help="lm-evaluation-harness tasks through the smdm adapter (smdm.harness; "
                       "pip install 'smdm[eval]')")
    add_arguments(p)
    parser.set_defaults(func=run)


def eos_id_of(tokenizer) -> Optional[int]:
    from smdm.generate_cli import EOS_NAMES

    for n in EOS_NAMES:
        i = tokenizer.token_to_id(n) if tokenizer is not None else None
        if i is not None:
            return i
    return None


def _check_args(args) -> None:
    for name in ("limit", "batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if getattr(args, "n_samples", 2) < 2:
        raise ValueError(f"--n-samples must be >= 2 (for a standard error), got {args.n_samples}")
    cfg = getattr(args, "cfg", 0.0)
    if not (cfg >= 0 and math.isfinite(cfg)):
        raise ValueError(f"--cfg must be finite and >= 0, got {cfg}")
    if args.task == "mc" and args.method not in (None, "elbo", "chain"):
        raise ValueError(f"--method must be elbo or chain, got {args.method!r}")
    if args.task == "mc" and args.method == "chain" and args.estimator != "time":
        raise ValueError(f"--estimator {args.estimator} is the ELBO's (--method elbo); --method chain is exact")
    if args.task == "mc" and args.method == "chain" and args.n_samples != N_SAMPLES:
        raise ValueError(f"--n-samples {args.n_samples} is the ELBO's (--method elbo); --method chain is exact")
    if args.task == "gsm8k":
        if args.few_shot < 0:
            raise ValueError(f"--few-shot must be >= 0, got {args.few_shot}")
        if args.gen_length < 1:
            raise ValueError(f"--gen-length must be >= 1, got {args.gen_length}")
        if args.steps is not None and args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        if args.steps is not None and args.sampler == "threshold":  # a note: a run may also hold an ARM
            print(f"smdm eval gsm8k: note: --steps {args.steps} is unused by --sampler threshold (its step count "
                  "is adaptive; the results record steps null, mean_steps and forward_passes)", file=sys.stderr)
        from smdm.sampling import SAMPLERS, check_mdm_options

        if args.sampler not in SAMPLERS:
            raise ValueError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {args.sampler!r}")
        if (args.sampler == "threshold") != (args.threshold is not None):
            raise ValueError("--threshold is required by --sampler threshold and used by no other sampler")
        try:
            check_mdm_options(args.gen_length, args.steps or args.gen_length, sampler=args.sampler,
                              block_length=args.block_length, threshold=args.threshold, cfg_scale=cfg)
        except ValueError as e:
            raise ValueError(f"the MDM sampler options: {e}") from None
        if args.schedule is not None:
            from smdm.diffusion import parse_schedule

            try:
                parse_schedule(args.schedule)
            except ValueError as e:
                raise ValueError(f"--schedule: {e}") from None
    if args.task == "ppl" and args.seq_len is not None and args.seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1, got {args.seq_len}")
    if args.json is not None:  # said now, not after the evaluation
        from smdm.cli import json_out

        try:
            json_out(args.json)
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"--json {e}") from None


def _pm(value: float, stderr: Optional[float]) -> str:
    return f"{value:.4f}" + ("" if stderr is None else f" ± {stderr:.4f}")


def _describe(res: dict) -> str:
    if res["task"] == "mc":
        how = res["method"] + (f" n={res['n_samples']}" if res["n_samples"] else "")
        how += f" {res['estimator']}" if res.get("estimator", "time") != "time" else ""
        how += f" cfg={res['cfg']:g}" if res["cfg"] else ""
        return (f"[{how}] n={res['n']}  acc {_pm(res['acc'], res['acc_stderr'])}  "
                f"acc_norm {_pm(res['acc_norm'], res['acc_norm_stderr'])}  "
                f"acc_token {_pm(res['acc_token'], res['acc_token_stderr'])}")
    if res["task"] == "gsm8k":
        return (f"n={res['n']} {res['few_shot']}-shot  acc {_pm(res['acc'], res['acc_stderr'])}  "
                f"({res['generated_tokens']} tokens, {res['forward_passes']} forward passes, "
                f"{res['seconds']:.1f} s)")
    se = f" ± {res['stderr']:.4f}" if res["n_samples"] else " (exact)"
    how = res["method"] + (f" {res['estimator']}" if res.get("estimator", "time") != "time" else "")
    return (f"[{how}] {res['windows']} windows, seq-len {res['seq_len']}  nll/token "
            f"{res['nll_per_token']:.4f}{se}  ppl {res['ppl']:.3f}")


def run(args) -> int:
    if args.task == "harness":
        from smdm.harness import run_cli

        return run_cli(args)
    set_threads(args.threads)  # before any parallel Rust call starts its pool
    try:
        _check_args(args)
        if args.task == "ppl" and args.seq_len is None:  # one L for every checkpoint: the same windows
            args.seq_len, why = _default_seq_len(args.ckpt)
            if why:
                print(f"smdm eval ppl: note: --seq-len {args.seq_len} ({why}; give --seq-len to change it)",
                      file=sys.stderr)
        results = [_run_one(args, ckpt) for ckpt in args.ckpt]
    except (ValueError, OSError) as e:  # EvalDataError, CheckpointError, SmdmIOError are ValueError/OSError
        print(f"smdm eval {args.task}: error: {e}", file=sys.stderr)
        return 2
    for ckpt, res in zip(args.ckpt, results):
        print(f"{ckpt} ({res['model']}): {_describe(res)}")
    if args.json:
        from smdm.data import write_atomic

        doc = {"task": args.task, "data": str(args.data), "results": results}
        try:
            write_atomic(args.json, (json.dumps(doc, indent=1) + "\n").encode())
        except OSError as e:  # SmdmIOError naming the file
            print(f"smdm eval {args.task}: error: --json: {e}", file=sys.stderr)
            return 2
    return 0


def _progress(ckpt) -> Optional[Callable]:
    """Questions done so far, redrawn on a terminal's stderr (nothing when stderr is not a terminal)."""
    if not sys.stderr.isatty():
        return None
    return lambda done, total: print(f"\r{ckpt}: {done}/{total}", end="" if done < total else "\n",
                                     file=sys.stderr, flush=True)


# the options an ARM checkpoint does not use (its likelihood is exact, it decodes left to right), with defaults
MDM_ONLY = {"mc": (("n_samples", N_SAMPLES), ("method", None), ("cfg", 0.0), ("estimator", "time")),
            "gsm8k": (("steps", None), ("sampler", "low_confidence"), ("block_length", None), ("cfg", 0.0),
                      ("threshold", None), ("schedule", None)),
            "ppl": (("n_samples", N_SAMPLES), ("estimator", "time"))}


def _trained_seq_len(conf: dict) -> Optional[int]:
    """L (`eval ppl` windows of L + 1 tokens, token 0 given) of the windows a checkpoint's config.json says it
    was trained on, or None when it does not record them (a converted checkpoint). The trainer's `--seq-len S`
    packs windows of S tokens for the MDM (L = S - 1: the same positions 0..S-1) and S + 1 for the ARM, whose
    inputs are its first S (L = S; `smdm.train`, PackedDataset(extra_token=...))."""
    train, model = conf.get("train"), conf.get("model")
    S = train.get("seq_len") if isinstance(train, dict) else None
    if not isinstance(S, int) or isinstance(S, bool) or S < 2 or not isinstance(model, dict):
        return None
    return S if model.get("causal") else S - 1


def _default_seq_len(ckpts) -> tuple:
    """(L, why) for `eval ppl` without --seq-len: the shortest over the checkpoints of the L each was trained
    at (`_trained_seq_len`), else of min(512, its context - 1). Scoring beyond the training length measures
    length extrapolation. A checkpoint whose config cannot be read is left to `smdm.load` to report ((None,
    None) when none can be)."""
    from smdm import checkpoint

    best = None
    for ckpt in ckpts:
        try:
            conf = checkpoint.read_config(checkpoint.resolve(ckpt))
            trained = _trained_seq_len(conf)
            L = trained if trained is not None else min(512, int(conf["model"]["max_seq_len"]) - 1)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        why = (f"windows of {L + 1} tokens, as {ckpt} was trained on" if trained is not None else
               f"{ckpt} does not record its training length: min(512, its context - 1)")
        if best is None or L < best[0]:
            best = (L, why)
    return best if best is not None else (None, None)


def _note_tokenizer(model, ckpt, args) -> None:
    """A note when the data's tokenizer_hash differs from the sha256 of the checkpoint's tokenizer.json while the
    vocab sizes agree (not an error: the same tokenizer saved again can hash differently; a differing
    vocab_size is `evaluate_ppl`'s error)."""
    from smdm import checkpoint
    from smdm.data import MANIFEST, load_manifest, resolve_dataset, sha256_file

    root = resolve_dataset(args.data, args.split)
    m = load_manifest(root)
    tok = checkpoint.resolve(ckpt) / "tokenizer.json"
    if m.vocab_size != model.config.vocab_size or m.tokenizer_hash is None or not tok.is_file():
        return
    if sha256_file(tok) != m.tokenizer_hash:
        print(f"smdm eval ppl: note: {tok} is not the tokenizer.json {root / MANIFEST} records (tokenizer_hash "
              f"differs; the vocab sizes agree): the scores hold only if it is the same tokenizer saved again",
              file=sys.stderr)


def _run_one(args, ckpt) -> dict:
    import smdm

    model, tokenizer = smdm.load(ckpt, device=args.device)
    kind = "ARM" if model.config.causal else "MDM"
    if model.config.causal:
        from smdm.generate_cli import note_mdm_only

        note_mdm_only(args, MDM_ONLY.get(args.task, ()), f"smdm eval {args.task}",
                      f"{ckpt} is an autoregressive model (exact likelihood, left-to-right decoding)")
    bs = args.batch_size
    if args.task == "ppl":
        seq_len = args.seq_len or min(512, model.config.max_seq_len - 1)  # (run() sets it from the configs)
        _note_tokenizer(model, ckpt, args)
        res = evaluate_ppl(model, args.data, seq_len=seq_len, limit=args.limit, n_samples=args.n_samples,
                           seed=args.seed, batch_size=bs or 8, doc_mask=args.doc_mask, split=args.split,
                           estimator=args.estimator, name=f"--ckpt {ckpt}")
    else:
        if tokenizer is None:
            raise ValueError(f"{ckpt} has no tokenizer.json (needed to encode the text of {args.data})")
        if args.task == "mc":
            items = read_mc(args.data, args.limit)
            method = None if model.config.causal else (args.method or "elbo")
            res = evaluate_mc(model, tokenizer, items, eos_id=eos_id_of(tokenizer), method=method,
                              n_samples=args.n_samples, seed=args.seed, cfg=0.0 if model.config.causal
                              else args.cfg, batch_size=bs or 64, estimator=args.estimator)
        else:
            items = read_gsm8k(args.data, args.limit)
            shots = []
            if args.few_shot:
                train = Path(args.train) if args.train else Path(args.data).with_name("train.jsonl")
                if not train.is_file():
                    raise ValueError(f"--few-shot {args.few_shot} takes its worked examples from {train}"
                                     f"{' (beside --data)' if not args.train else ''}: no such file; give --train FILE")
                shots = read_gsm8k(train, args.few_shot)
                if len(shots) < args.few_shot:
                    raise ValueError(f"{train} holds {len(shots)} examples, --few-shot {args.few_shot}")
            mdm = {}
            if not model.config.causal:
                from smdm import checkpoint
                from smdm.generate_cli import resolve_schedule

                schedule = resolve_schedule(args, checkpoint.read_config(checkpoint.resolve(ckpt)))
                mdm = dict(steps=args.steps, sampler=args.sampler, block_length=args.block_length, cfg=args.cfg,
                           threshold=args.threshold, schedule=schedule)
            res = evaluate_gsm8k(model, tokenizer, items, shots=shots, gen_length=args.gen_length,
                                 batch_size=bs or 8, seed=args.seed, eos_id=eos_id_of(tokenizer),
                                 progress=_progress(ckpt), **mdm)
    res["model"] = kind
    res["ckpt"] = str(ckpt)
    return res


def main(argv: Optional[list] = None) -> int:
    """`python -m smdm.evaluate mc ...` (the same as `smdm eval mc ...`)."""
    parser = argparse.ArgumentParser(prog="smdm eval")
    register(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

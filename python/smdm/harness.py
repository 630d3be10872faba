# smdm eval harness --ckpt runs/mdm --ckpt runs/arm --tasks my_task --include-path tasks/ --json out.json
"""lm-evaluation-harness adapter: any lm-eval task (multiple choice, loglikelihood, rolling perplexity,
generate_until) on an smdm MDM or its ARM twin, scored exactly as `smdm eval` scores them.

    pip install 'smdm[eval]'                          # lm-eval (Python >= 3.10) is optional
    smdm eval harness --ckpt DIR --tasks T[,T2] [--include-path P] [--limit N] [--json F]
    python -m smdm.harness --ckpt DIR --tasks T ...   # the same command
    smdm lm-eval --model smdm --model_args ckpt=DIR --tasks T [any lm-eval option]
                                                      # lm-eval's own CLI with "smdm" registered (below)

    import lm_eval, smdm.harness
    smdm.harness.register()                           # imports lm_eval, registers the model name "smdm"
    lm_eval.simple_evaluate(model="smdm", model_args="ckpt=runs/mdm,mc_samples=128", tasks=[...])

lm_eval is imported only by `register()` (or the attribute `smdm.harness.SmdmLM`, or the CLI), never by
`import smdm` / `import smdm.harness`; without it they raise ImportError saying `pip install 'smdm[eval]'`.
`SmdmLM` is `lm_eval.api.model.LM` with the methods of `_Adapter` (this file), registered as "smdm".

Model arguments (`model_args="k=v,..."`, or keyword arguments):
    ckpt            checkpoint dir (a step dir or a run dir: its latest step); its tokenizer.json is the
                    tokenizer (nothing is fetched from a hub)
    device          cpu | cuda[:i] (default: cuda when available)
    batch_size      model rows per forward pass for scoring, prompts per batch for generation (default 16)
    method          MDM: elbo (default) | chain (smdm.evaluate.score; the ARM is always exact, "ar")
    mc_samples      Monte Carlo samples per request for the ELBO (default 128: the default of `smdm eval mc`,
                    SMDM's validation setting; the paper's benchmarks use up to 1024 for less noise)
    estimator       the ELBO's estimator: time (default, the paper's) | count (LLaDA's, finite variance;
                    smdm.evaluate.score)
    cfg             unsupervised CFG weight w of the MDM's scores and generations (default 0 = off)
    seed            Monte Carlo and sampler seed (default 0)
    greedy          how is_greedy is decided: auto (default) | decode | off (below)
    rolling_context clean tokens before each window of loglikelihood_rolling after the first (default 1)
    steps, block_length, sampler, threshold, schedule, temperature, max_gen_toks
                    generation (smdm.generate; the MDM's sampler options; max_gen_toks is the length when a
                    request gives none, default 256; steps default = the generation length; threshold is
                    sampler=threshold's; schedule default = the checkpoint's training schedule, else linear)

loglikelihood(requests) -> [(log p(continuation | context), is_greedy)]:
    The pair is tokenized by `smdm.evaluate.encode_pair` (lm-eval's split) with an empty context standing for
    [EOS], and scored by `smdm.evaluate.score`: the same numbers as `smdm eval mc` (same seed, samples and
    row keys), so acc / acc_norm of a multiple-choice task equal `smdm eval mc` on the same items. A context
    that does not fit the model's window with the continuation is cut from the left (`smdm eval mc` raises).
    A continuation of no tokens (an empty choice) is (0.0, True) without a forward pass: log p = log 1, as
    lm-eval's own models return it.
    With the ELBO the value is a Monte Carlo estimate of a lower bound on log p; with cfg > 0 a guided score.
    is_greedy:
    - ARM: every continuation token is the argmax of the next-token logits given its prefix (exact, from the
      scoring pass).
    - MDM, method chain: every token is the argmax (of the guided logits with cfg) at its own step of the
      left-to-right chain rule (the rest masked), from the scoring pass: the greedy one-token-per-step
      left-to-right decoder reproduces the continuation.
    - MDM, method elbo (greedy=auto or decode): the continuation equals `smdm.generate` from the context with
      len(continuation) masks, steps = len(continuation), sampler low_confidence, temperature 0 (and the same
      cfg): the sampler's own greedy decode. Costs one forward row per continuation token, shared by the
      continuations of equal length of one context (the choices of a question); greedy=off skips it and
      returns False for every request. greedy=decode applies this rule to method chain too.

loglikelihood_rolling(requests) -> [log p(text)]: the text's tokens, preceded by [EOS], cut into windows that
    predict every token once (lm-eval's rolling windows). A window holds at most B tokens, B = max_seq_len + 1
    for the ARM (it feeds B - 1) and max_seq_len for the MDM (the predicted tokens are in its input too): the
    first window predicts tokens [0, B - 1) given [EOS]; every later one predicts the next up to
    B - rolling_context tokens given the B - (its length) tokens before them (so the last window gets the
    longest context). The ARM's sum is exact, each token conditioned on what its window holds before it
    (the windows of lm-eval's HF model: get_rolling_token_windows with max_length = max_seq_len, tested);
    the MDM's is the sum over windows of the Monte Carlo ELBO of each window given its context (method chain
    would cost one forward row per token, so rolling always uses the ELBO; cfg applies). With
    rolling_context 1 an MDM window is shaped like one of `smdm eval ppl --seq-len max_seq_len-1` (one clean
    token, then the predicted ones), cut from one document instead of the packed stream.

generate_until(requests) -> [text]: `smdm.generate` (batch invariant, so prompts of different lengths share
    batches) of `max_gen_toks` tokens (the request's, else the model argument), stopped at EOS, decoded, cut
    at the first occurrence of any `until` string. temperature: the request's `temperature`; else 0 when
    `do_sample` is false or absent, else the model argument (default 0: greedy). top_k / top_p are passed on;
    any other generation key is an error. The prompt keeps its last max_seq_len - max_gen_toks tokens; an empty
    context is [EOS].
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional

from smdm.config import ELBO_ESTIMATORS

INSTALL_HINT = "pip install 'smdm[eval]'"
GREEDY = ("auto", "decode", "off")
GEN_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")

_CLASS = None  # SmdmLM once register() has run


def _import_lm_eval():
    try:
        import lm_eval
        import lm_eval.api.model
        import lm_eval.api.registry
        import lm_eval.models  # noqa: F401  lm-eval's own names (lazy placeholders); its get_model
        # imports them only while the registry is empty, so they must be in before "smdm" is added
    except ImportError as e:
        raise ImportError(f"the lm-evaluation-harness adapter needs lm-eval (`{INSTALL_HINT}`): {e}") from None
    return lm_eval


def register() -> type:
    """Import lm_eval, build `SmdmLM` (an `lm_eval.api.model.LM` subclass) and register it as model "smdm".
    Idempotent; returns the class."""
    global _CLASS
    if _CLASS is None:
        lm_eval = _import_lm_eval()
        cls = type("SmdmLM", (_Adapter, lm_eval.api.model.LM), {"__module__": __name__, "__doc__": __doc__})
        if "smdm" not in lm_eval.api.registry.model_registry:
            lm_eval.api.registry.register_model("smdm")(cls)
        _CLASS = cls
    return _CLASS


def __getattr__(name):  # `smdm.harness.SmdmLM`: registers on first use (keeps the module import light)
    if name == "SmdmLM":
        return register()
    raise AttributeError(f"module 'smdm.harness' has no attribute {name!r}")


# ------------------------------------------------------------------------------------------------------------
# Option parsing (lm-eval hands model_args over as strings, ints, floats, bools or None)


class ModelArgumentError(ValueError):
    """A bad smdm model argument (`model_args="k=v,..."`): `smdm lm-eval` says it in one line, exit 2."""


def _int(name, v, lo, none_ok=False):
    if v is None and none_ok:
        return None
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ModelArgumentError(f"smdm model argument {name}={v!r}: expected an integer >= {lo}"
                                 + (" (or none)" if none_ok else ""))
    return v


def _float(name, v, lo=0.0):
    try:
        x = float(v)
    except (TypeError, ValueError):
        x = float("nan")
    if isinstance(v, bool) or not (math.isfinite(x) and x >= lo):
        raise ModelArgumentError(f"smdm model argument {name}={v!r}: expected a finite number >= {lo:g}")
    return x


def rolling_windows(tokens: list, prefix: int, budget: int, context: int = 1) -> list:
    """(context ids, predicted ids) windows of loglikelihood_rolling (module docstring): every token predicted
    exactly once, each window at most `budget` tokens, the first given [prefix], each later one given the
    tokens just before it (at least `context` of them)."""
    if not 1 <= context < budget - 1:
        raise ValueError(f"rolling context {context} must be in [1, {budget - 2}] for windows of {budget} tokens")
    if not tokens:
        return []
    out = [([prefix], tokens[:budget - 1])]
    done = len(out[0][1])
    while done < len(tokens):
        n = min(len(tokens) - done, budget - context)
        out.append((tokens[max(0, done - (budget - n)):done], tokens[done:done + n]))
        done += n
    return out


# ------------------------------------------------------------------------------------------------------------
# The adapter


class _Adapter:
    """The methods of `SmdmLM` (module docstring); combined with lm_eval's LM base class by `register()`."""

    def __init__(self, ckpt=None, device=None, batch_size=None, max_batch_size=None, method=None,
                 mc_samples=128, estimator="time", cfg=0.0, seed=0, greedy="auto", rolling_context=1, steps=None,
                 block_length=None, sampler="low_confidence", temperature=0.0, max_gen_toks=256, threshold=None,
                 schedule=None, pretrained=None, **unknown):
        super().__init__()  # lm_eval's LM: rank 0 of 1, no cache hook
        if pretrained is not None:  # lm-eval's usual name: it names --output_path's folder after it
            if ckpt is not None and str(ckpt) != str(pretrained):
                raise ModelArgumentError(f"smdm model arguments ckpt={ckpt} and pretrained={pretrained} differ "
                                         f"(pretrained is another name for ckpt)")
            ckpt = pretrained
        if unknown:
            raise ModelArgumentError(
                f"unknown smdm model argument(s): {', '.join(sorted(unknown))} (known: ckpt, device, batch_size, "
                "method, mc_samples, estimator, cfg, seed, greedy, rolling_context, steps, block_length, sampler, "
                "threshold, schedule, temperature, max_gen_toks, pretrained)")
        if ckpt is None:
            raise ModelArgumentError("smdm model argument ckpt is required (model_args='ckpt=DIR,...')")
        import smdm
        from smdm.evaluate import eos_id_of
        from smdm.sampling import SAMPLERS

        if batch_size in (None, ""):
            batch_size = 16
        self.batch_size = _int("batch_size", batch_size, 1)
        del max_batch_size  # lm-eval's automatic batch size search: not used (batch_size is rows, fixed)
        self.model, self.tokenizer = smdm.load(str(ckpt), device=device)
        conf = self.model.config
        self.causal = bool(conf.causal)
        if self.tokenizer is None:
            raise ModelArgumentError(f"smdm model argument ckpt={ckpt}: the checkpoint has no tokenizer.json "
                                     "(lm-eval requests are text)")
        self.ckpt = str(ckpt)
        self.eos_id = eos_id_of(self.tokenizer)
        if method in (None, "", "none"):
            method = "ar" if self.causal else "elbo"
        if method not in (("ar",) if self.causal else ("elbo", "chain")):
            raise ModelArgumentError(f"smdm model argument method={method!r}: " + (
                "the ARM twin is scored exactly (method ar)" if self.causal else "the MDM takes elbo or chain"))
        self.method = method
        self.mc_samples = _int("mc_samples", mc_samples, 2)
        if estimator not in ELBO_ESTIMATORS:
            raise ModelArgumentError(f"smdm model argument estimator={estimator!r}: expected one of "
                                     f"{', '.join(ELBO_ESTIMATORS)}")
        if estimator != "time" and self.causal:
            raise ModelArgumentError(f"smdm model argument estimator={estimator}: the ELBO's estimator applies to "
                                     f"the MDM only ({ckpt} is an ARM, scored exactly)")
        self.estimator = estimator
        self.cfg = _float("cfg", cfg)
        if self.cfg and self.causal:
            raise ModelArgumentError(f"smdm model argument cfg={cfg}: CFG applies to the MDM only ({ckpt} is an ARM)")
        self.seed = _int("seed", seed, 0)
        if greedy not in GREEDY:
            raise ModelArgumentError(f"smdm model argument greedy={greedy!r}: expected one of {', '.join(GREEDY)}")
        if greedy == "decode" and self.causal:
            raise ModelArgumentError("smdm model argument greedy=decode: the ARM's is_greedy is exact (use auto)")
        self.greedy = greedy
        self.rolling_context = _int("rolling_context", rolling_context, 1)
        if self.rolling_context > self.max_length - (2 if not self.causal else 1):
            raise ModelArgumentError(f"smdm model argument rolling_context={rolling_context}: leaves no token to "
                                     f"predict in a window of the model's context ({self.max_length})")
        self.steps = _int("steps", steps, 1, none_ok=True)
        self.block_length = _int("block_length", block_length, 1, none_ok=True)
        if sampler not in SAMPLERS:
            raise ModelArgumentError(f"smdm model argument sampler={sampler!r}: expected one of {', '.join(SAMPLERS)}")
        self.sampler = sampler
        self.threshold = None if threshold in (None, "", "none") else _float("threshold", threshold, -math.inf)
        if (sampler == "threshold") != (self.threshold is not None):
            raise ModelArgumentError(f"smdm model argument threshold={threshold!r}: sampler=threshold needs it, "
                                     f"the other samplers take none (sampler={sampler})")
        from types import SimpleNamespace

        from smdm import checkpoint
        from smdm.generate_cli import resolve_schedule

        given = None if schedule in (None, "", "none") else schedule
        try:  # as `smdm generate`: given, else the schedule the model was trained with, else linear
            self.schedule = resolve_schedule(SimpleNamespace(schedule=given),
                                             checkpoint.read_config(checkpoint.resolve(ckpt)))
        except ValueError as e:
            raise ModelArgumentError(f"smdm model argument schedule={schedule!r}: {e}") from None
        self.temperature = _float("temperature", temperature)
        self.max_gen_toks = _int("max_gen_toks", max_gen_toks, 1)
        self._device = self.model.head.weight.device

    # ---- helpers ----------------------------------------------------------------------------------------------

    @property
    def max_length(self) -> int:
        return int(self.model.config.max_seq_len)

    def _encode(self, text: str) -> list:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _need_eos(self, what: str) -> int:
        if self.eos_id is None:
            raise ValueError(f"{self.ckpt}: the tokenizer has no EOS token to stand for {what}")
        return self.eos_id

    def _score(self, pairs: list, method: str):
        from smdm.evaluate import score

        return score(self.model, pairs, method=method, n_samples=self.mc_samples, seed=self.seed,
                     cfg=self.cfg, batch_size=self.batch_size, estimator=self.estimator)

    def get_model_info(self) -> dict:
        """Added to lm-eval's results["config"]. An MDM's ELBO settings are there with method=chain too:
        loglikelihood_rolling always scores the MDM by its ELBO."""
        return {"smdm_ckpt": self.ckpt, "smdm_model": "ARM" if self.causal else "MDM", "smdm_method": self.method,
                "smdm_mc_samples": 0 if self.causal else self.mc_samples, "smdm_cfg": self.cfg,
                "smdm_estimator": None if self.causal else self.estimator,
                "smdm_seed": self.seed}

    # ---- lm-eval's three request types ------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list:
        from smdm.evaluate import encode_pair

        budget = self.max_length + (1 if self.causal else 0)  # tokens of one scored row (context + target)
        pairs, scored = [], []  # scored: the requests with a non-empty continuation
        out = [(0.0, True)] * len(requests)  # an empty continuation: log p = log 1, greedy (as lm-eval's HF LM)
        for i, req in enumerate(requests):
            context, continuation = req.args[0], req.args[1]
            ctx, cont = encode_pair(self.tokenizer, context, continuation)
            if not ctx:  # as `smdm eval mc` and lm-eval: an empty context is [EOS]
                ctx = [self._need_eos("an empty context")]
            if not cont:
                continue
            if len(cont) >= budget:
                raise ValueError(f"request {i}: the continuation has {len(cont)} tokens, the model's context "
                                 f"is {self.max_length}")
            pairs.append((ctx[-(budget - len(cont)):], cont))
            scored.append(i)
        if pairs:
            s = self._score(pairs, self.method)
            if s.greedy is not None and self.greedy == "auto":
                greedy = s.greedy.tolist()
            elif self.greedy == "off":
                greedy = [False] * len(pairs)
            else:
                greedy = self._decoded_greedy(pairs)
            for i, nll, g in zip(scored, s.nll, greedy):
                out[i] = (-float(nll), bool(g))
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    def _decoded_greedy(self, pairs: list) -> list:
        """MDM: does low_confidence, temperature 0, one token per step, decode each continuation from all masks?
        One decode per distinct (context, length)."""
        from smdm.sampling import generate

        by_len = defaultdict(dict)  # continuation length -> {context tuple: decoded ids}
        for ctx, cont in pairs:
            by_len[len(cont)].setdefault(tuple(ctx), None)
        for n, table in by_len.items():
            ctxs = list(table)
            for a in range(0, len(ctxs), self.batch_size):
                chunk = ctxs[a:a + self.batch_size]
                out = generate(self.model, [list(c) for c in chunk], gen_length=n, steps=n,
                               sampler="low_confidence", temperature=0.0, cfg_scale=self.cfg, seed=self.seed)
                for c, toks in zip(chunk, out.tokens):
                    table[c] = toks
        return [by_len[len(cont)][tuple(ctx)] == cont for ctx, cont in pairs]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
        budget = self.max_length + (1 if self.causal else 0)
        pairs, owner = [], []
        for i, req in enumerate(requests):
            windows = rolling_windows(self._encode(req.args[0]), self._need_eos("the start of a text"), budget,
                                      self.rolling_context)
            pairs += windows
            owner += [i] * len(windows)
        totals = [0.0] * len(requests)
        if pairs:
            s = self._score(pairs, "ar" if self.causal else "elbo")
            for i, nll in zip(owner, s.nll):
                totals[i] -= float(nll)
        for req, res in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, res)
        return totals

    def _gen_options(self, i: int, kwargs: dict) -> tuple:
        unknown = sorted(set(kwargs) - set(GEN_KEYS))
        if unknown:
            raise ValueError(f"generate_until request {i}: unsupported generation argument(s) {unknown} "
                             f"(smdm takes {', '.join(GEN_KEYS)})")
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        if not all(isinstance(u, str) for u in until):
            raise ValueError(f"generate_until request {i}: 'until' must be a string or a list of strings, "
                             f"got {kwargs.get('until')!r}")
        n = _int("max_gen_toks", kwargs.get("max_gen_toks", self.max_gen_toks), 1)
        if "temperature" in kwargs:
            temperature = _float("temperature", kwargs["temperature"])
        else:
            temperature = self.temperature if kwargs.get("do_sample") else 0.0
        top_k = kwargs.get("top_k")
        top_p = kwargs.get("top_p")
        return until, (n, temperature, top_k, top_p)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list:
        from smdm.sampling import generate

        groups = defaultdict(list)  # generation options -> request indices (one smdm.generate setting each)
        untils, prompts = [], []
        for i, req in enumerate(requests):
            context, kwargs = req.args[0], dict(req.args[1] or {})
            until, opts = self._gen_options(i, kwargs)
            n = opts[0]
            if n >= self.max_length:
                raise ValueError(f"generate_until request {i}: max_gen_toks={n} leaves no room for a prompt in "
                                 f"the model's context of {self.max_length}")
            ids = self._encode(context) or [self._need_eos("an empty context")]
            prompts.append(ids[-(self.max_length - n):])
            untils.append(until)
            groups[opts].append(i)
        texts = [""] * len(requests)
        for (n, temperature, top_k, top_p), idx in groups.items():
            kw = dict(gen_length=n, temperature=temperature, top_k=top_k, top_p=top_p, eos_id=self.eos_id,
                      seed=self.seed)
            if not self.causal:
                kw.update(steps=self.steps or n, sampler=self.sampler, block_length=self.block_length,
                          cfg_scale=self.cfg, threshold=self.threshold, schedule=self.schedule)
            for a in range(0, len(idx), self.batch_size):
                chunk = idx[a:a + self.batch_size]
                out = generate(self.model, [prompts[i] for i in chunk], **kw)
                for i, toks in zip(chunk, out.tokens):
                    texts[i] = cut_at_stop(self.tokenizer.decode(toks), untils[i])
        for req, res in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", req.args, res)
        return texts


def cut_at_stop(text: str, until) -> str:
    """`text` up to the earliest occurrence of any (non-empty) stop string."""
    cut = min((text.find(u) for u in until if u and u in text), default=len(text))
    return text[:cut]


# ------------------------------------------------------------------------------------------------------------
# Command line: `smdm eval harness` (registered by smdm.evaluate) and `python -m smdm.harness`


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `smdm eval harness` (no lm_eval import)."""
    from smdm.cli import json_out, positive_float

    p.add_argument("--ckpt", action="append", required=True,
                   help="checkpoint (step dir or run dir); repeat to run several models on the same tasks")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task (or group) names")
    p.add_argument("--include-path", action="append", default=None, metavar="DIR",
                   help="folder of task YAMLs (repeatable)")
    p.add_argument("--limit", type=positive_float, default=None,
                   help="first N documents per task (< 1: a fraction)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    p.add_argument("--batch-size", type=int, default=None, help="rows (or prompts) per forward pass (16)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="Monte Carlo / sampler seed")
    p.add_argument("--method", default=None, help="MDM: elbo (default) | chain")
    p.add_argument("--n-samples", type=int, default=128, help="Monte Carlo samples per request (MDM elbo)")
    p.add_argument("--estimator", default="time", choices=ELBO_ESTIMATORS,
                   help="MDM elbo: time (the paper's, 1/t weights) | count (LLaDA's, finite variance)")
    p.add_argument("--cfg", type=float, default=0.0, help="unsupervised CFG weight w (MDM; 0 = off)")
    p.add_argument("--greedy", default="auto", choices=GREEDY, help="MDM is_greedy: auto (chain: exact; elbo: "
                   "decode), decode (greedy decode reproduces the continuation), off (always False)")
    p.add_argument("--max-gen-toks", type=int, default=256, help="generation length when a task gives none")
    p.add_argument("--steps", type=int, default=None, help="MDM sampler steps (default: the generation length)")
    p.add_argument("--sampler", default="low_confidence", help="MDM sampler (smdm.sampling.SAMPLERS)")
    p.add_argument("--threshold", type=float, default=None, help="confidence threshold of --sampler threshold")
    p.add_argument("--block-length", type=int, default=None, help="MDM semi-autoregressive block length")
    p.add_argument("--schedule", default=None, help="MDM sampler schedule: linear | cosine | polynomial:P "
                   "(default: the checkpoint's training schedule, else linear)")
    p.add_argument("--temperature", type=float, default=0.0, help="for requests that ask to sample (do_sample)")
    p.add_argument("--bootstrap-iters", type=int, default=100000, help="lm-eval's bootstrap for the standard "
                   "errors of non-mean metrics (0: skip them)")
    p.add_argument("--json", default=None, metavar="OUT", type=json_out,
                   help="write lm-eval's results per model to OUT (its directory must exist)")


# the `smdm eval harness` options an ARM checkpoint does not use, with their defaults
MDM_ONLY = (("method", None), ("n_samples", 128), ("estimator", "time"), ("cfg", 0.0), ("greedy", "auto"),
            ("steps", None), ("sampler", "low_confidence"), ("block_length", None), ("threshold", None),
            ("schedule", None))


def model_args(args, ckpt) -> dict:
    """The model arguments of `SmdmLM` from the CLI options. As in `smdm eval mc`, the MDM-only options (method,
    cfg, greedy=decode) apply to the MDMs of a run and are left out for an ARM twin."""
    from smdm import checkpoint

    causal = bool(checkpoint.read_config(checkpoint.resolve(ckpt))["model"].get("causal"))
    mdm_only = {} if causal else {"method": args.method, "cfg": args.cfg, "greedy": args.greedy,
                                  "estimator": args.estimator,
                                  "threshold": args.threshold, "schedule": args.schedule}
    if causal:  # said, not dropped in silence (as `smdm generate` and `smdm eval mc` say it)
        from smdm.generate_cli import note_mdm_only

        note_mdm_only(args, MDM_ONLY, "smdm eval harness", f"{ckpt} is an autoregressive model")
    return {"ckpt": str(ckpt), "device": args.device, "batch_size": args.batch_size,
            "mc_samples": args.n_samples, "seed": args.seed, "steps": args.steps, "block_length": args.block_length,
            "sampler": args.sampler, "temperature": args.temperature, "max_gen_toks": args.max_gen_toks,
            **mdm_only}


def task_manager(tasks: list, include_path=None):
    """lm-eval's TaskManager over `include_path` alone when it holds every task in `tasks` (indexing lm-eval's
    ~15k built-in task configs takes ~20 s on a small CPU), else over the built-in tasks too."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=include_path)


def run_cli(args, prog: str = "smdm eval harness") -> int:
    """`smdm eval harness`: lm_eval.simple_evaluate per checkpoint, lm-eval's table printed, JSON optional."""
    try:
        lm_eval = _import_lm_eval()
        register()
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not tasks:
            raise ValueError(f"--tasks {args.tasks!r} names no task")
        for path in args.include_path or []:
            if not Path(path).is_dir():
                raise ValueError(f"--include-path {path}: no such directory")
        manager = task_manager(tasks, args.include_path)
        missing = [t for t in tasks if t not in manager.all_tasks]
        if missing:
            raise ValueError(f"--tasks: unknown task(s) {missing}" + (
                f" (none in --include-path {args.include_path})" if args.include_path else ""))
        results = []
        for ckpt in args.ckpt:
            res = lm_eval.simple_evaluate(model="smdm", model_args=model_args(args, ckpt), tasks=tasks,
                                          task_manager=manager, limit=args.limit, num_fewshot=args.num_fewshot,
                                          bootstrap_iters=args.bootstrap_iters, log_samples=False,
                                          random_seed=args.seed)
            results.append((ckpt, res))
    except (ImportError, ValueError, TypeError, KeyError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    doc = {"task": "harness", "tasks": tasks, "results": []}
    for ckpt, res in results:
        info = res["config"]
        print(f"{ckpt} ({info['smdm_model']}, {info['smdm_method']}"
              + (f" n={info['smdm_mc_samples']}" if info["smdm_mc_samples"] else "")
              + (f" {info['smdm_estimator']}" if info.get("smdm_estimator") not in (None, "time") else "")
              + (f" cfg={info['smdm_cfg']:g}" if info["smdm_cfg"] else "") + ")")
        print(lm_eval.utils.make_table(res))
        doc["results"].append({"ckpt": str(ckpt), "model": info["smdm_model"],
                               **{k: res.get(k) for k in ("results", "groups", "versions", "n-shot", "n-samples",
                                                          "higher_is_better", "config")}})
    if args.json:
        from smdm.data import write_atomic

        text = json.dumps(doc, indent=1, default=lm_eval.utils.handle_non_serializable)
        write_atomic(args.json, (text + "\n").encode())
    return 0


def main(argv: Optional[list] = None) -> int:
    """`python -m smdm.harness ...` (the same as `smdm eval harness ...`)."""
    parser = argparse.ArgumentParser(prog="python -m smdm.harness", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_cli(parser.parse_args(sys.argv[1:] if argv is None else argv), parser.prog)


def lm_eval_main(argv: list) -> int:
    """`smdm lm-eval ARGS`: lm-eval's own command line (`lm-eval ARGS`: run / ls / validate, every option:
    --output_path, --log_samples, --num_fewshot, --gen_kwargs, ...) with the model "smdm" registered, which
    lm-eval >= 0.4 cannot find by itself (it has no plugin discovery). lm-eval's `--batch_size` and `--device`
    reach the adapter as its model arguments; where they are not given, the CPU when there is no CUDA and the
    adapter's 16 rows (lm-eval's defaults are cuda:0 and 1). Returns lm-eval's exit status."""
    try:
        register()  # imports lm_eval (ImportError naming the extra to install)
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        print(f"smdm lm-eval: error: {e}", file=sys.stderr)
        return 2
    import torch

    from smdm import checkpoint

    argv = list(argv)
    for i, a in enumerate(argv):  # the checkpoint of --model_args ckpt=DIR: said here, not as lm-eval's traceback
        value = a.split("=", 1)[1] if a.startswith("--model_args=") else (
            argv[i + 1] if a == "--model_args" and i + 1 < len(argv) else None)
        parts = [p.strip() for p in (value or "").split(",")]
        for part in parts:
            if part.startswith(("ckpt=", "pretrained=")):
                try:
                    checkpoint.resolve(part.split("=", 1)[1])
                except (checkpoint.CheckpointError, OSError) as e:
                    print(f"smdm lm-eval: error: --model_args {part.split('=')[0]}: {e}", file=sys.stderr)
                    return 2
        ckpt = next((p.split("=", 1)[1] for p in parts if p.startswith("ckpt=")), None)
        if ckpt is not None and not any(p.startswith("pretrained=") for p in parts):
            # lm-eval names --output_path's folder after pretrained= (else one random name for every model)
            value = f"{value},pretrained={ckpt}"
            if a.startswith("--model_args="):
                argv[i] = f"--model_args={value}"
            else:
                argv[i + 1] = value
    runs = not argv or argv[0] not in ("ls", "validate")

    def given(flag: str) -> bool:
        return any(a == flag or a.startswith(flag + "=") for a in argv)

    if runs and not given("--device") and not torch.cuda.is_available():  # lm-eval's default device is cuda:0
        argv = [*argv, "--device", "cpu"]
    if runs and not given("--batch_size") and not any("batch_size=" in a for a in argv):
        argv = [*argv, "--batch_size", "16"]  # lm-eval's default 1 would override the adapter's 16 rows
    saved = sys.argv
    sys.argv = ["smdm lm-eval", *argv]  # lm-eval parses sys.argv (and inserts `run` where no subcommand is)
    try:
        cli_evaluate()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except ModelArgumentError as e:  # the adapter refused a model argument: one line, as `smdm eval harness`
        print(f"smdm lm-eval: error: {e}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())

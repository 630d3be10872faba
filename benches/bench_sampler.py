# python -m pytest benches/bench_sampler.py --benchmark-group-by=group --benchmark-columns=min,median,ops
"""Generation throughput (CPU, tiny config, random weights): each MDM sampler against the ARM twin with its
static KV cache (the DESIGN §8 baseline) in the same group, plus the token-choice reference against plain
torch sampling. Each variant is checked to produce the full generation before timing. `smdm bench sampler`
prints the same comparison as a table + JSON (tokens/s, forward passes, ratio to the ARM)."""

from __future__ import annotations

import pytest
import torch
from smdm.model import build_model, config_by_name
from smdm.sampling import choose_tokens, choose_tokens_cpu, generate

VOCAB, PROMPT, GEN, BATCH = 2000, 16, 64, 4
VARIANTS = {
    "arm_kv_cache": None,  # the baseline
    "ancestral": dict(sampler="ancestral", steps=GEN // 4),
    "low_confidence": dict(sampler="low_confidence", steps=GEN // 4),
    "blocks": dict(sampler="low_confidence", steps=GEN // 4, block_length=16),
    "blocks_prefix_cache": dict(sampler="low_confidence", steps=GEN // 4, block_length=16, cache="prefix"),
    "blocks_dual_cache": dict(sampler="low_confidence", steps=GEN // 4, block_length=16, cache="dual"),
    "low_confidence_cfg": dict(sampler="low_confidence", steps=GEN // 4, cfg_scale=1.0),
}


@pytest.fixture(scope="module")
def models():
    return {causal: build_model(config_by_name("tiny", vocab_size=VOCAB, causal=causal)).eval()
            for causal in (False, True)}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_generate(benchmark, models, name):
    benchmark.group = f"generate tiny gen={GEN} B={BATCH}"
    kw = VARIANTS[name]
    prompts = torch.randint(0, VOCAB, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0)).tolist()
    args = dict(cache="prefix", batch_invariant=False) if kw is None else kw
    model = models[kw is None]
    fn = lambda: generate(model, prompts, gen_length=GEN, seed=list(range(BATCH)), **args)
    out = fn()
    assert [len(t) for t in out.tokens] == [GEN] * BATCH  # the same work as the baseline
    benchmark.pedantic(fn, rounds=3, iterations=1)
    benchmark.extra_info.update(forward_passes=out.forward_passes, generated_tokens=out.generated_tokens)


@pytest.mark.parametrize("name", ["torch_multinomial", "choose_tokens", "choose_tokens_cpu"])
@pytest.mark.parametrize("V", [8192, 32000])
def test_token_choice(benchmark, name, V):
    """Sampling 256 positions at T = 1: the counter-based Gumbel-max choice, PyTorch reference
    (`choose_tokens`) and Rust (`choose_tokens_cpu`, the default on CPU; checked bit-identical first), vs
    torch.multinomial (a baseline with another generator, so only validity is compared)."""
    benchmark.group = f"token choice N=256 V={V} T=1"
    logits = torch.randn(256, V, generator=torch.Generator().manual_seed(0))
    seeds = torch.zeros(256, dtype=torch.int64)
    pos = torch.arange(256)
    if name == "torch_multinomial":
        fn = lambda: torch.multinomial(torch.softmax(logits, -1), 1)[:, 0]
    else:
        choose = {"choose_tokens": choose_tokens, "choose_tokens_cpu": choose_tokens_cpu}[name]
        fn = lambda: choose(logits, seeds=seeds, positions=pos, step=0, temperature=1.0)
        tok, conf = fn()
        ref_tok, ref_conf = choose_tokens(logits, seeds=seeds, positions=pos, step=0, temperature=1.0)
        assert torch.equal(tok, ref_tok) and torch.equal(conf, ref_conf)
    tok = fn()
    tok = tok[0] if isinstance(tok, tuple) else tok
    assert tok.shape == (256,) and int(tok.max()) < V
    benchmark.pedantic(fn, rounds=5, iterations=1)


@pytest.mark.parametrize("name", ["choose_tokens", "choose_tokens_cpu"])
@pytest.mark.parametrize("filters", [dict(top_k=50), dict(top_p=0.9), dict(top_k=50, top_p=0.9)],
                         ids=["top_k50", "top_p0.9", "top_k50_top_p0.9"])
def test_filtered_token_choice(benchmark, name, filters):
    """The same with top-k / top-p (the reference sorts every row; Rust selects / sorts integer keys)."""
    benchmark.group = "token choice N=256 V=32000 T=1 " + " ".join(f"{k}={v}" for k, v in filters.items())
    logits = torch.randn(256, 32000, generator=torch.Generator().manual_seed(0)) * 3
    args = dict(seeds=torch.zeros(256, dtype=torch.int64), positions=torch.arange(256), step=0, temperature=1.0,
                **filters)
    choose = {"choose_tokens": choose_tokens, "choose_tokens_cpu": choose_tokens_cpu}[name]
    tok, conf = choose(logits, **args)
    ref_tok, ref_conf = choose_tokens(logits, **args)
    assert torch.equal(tok, ref_tok) and torch.equal(conf, ref_conf)
    benchmark.pedantic(lambda: choose(logits, **args), rounds=3, iterations=1)

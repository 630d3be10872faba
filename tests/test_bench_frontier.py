# pytest tests/test_bench_frontier.py
"""`smdm bench frontier`: the quality columns against their definitions, and a real run of the command on saved
checkpoints (speed and quality per variant, the reference text, JSON), plus its errors."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from smdm import checkpoint
from smdm.benchmarks import frontier
from smdm.model import build_model, config_by_name


def test_sample_entropy_is_the_unigram_entropy():
    assert frontier.sample_entropy([7] * 9) == 0.0
    assert frontier.sample_entropy([1, 2, 1, 2]) == pytest.approx(math.log(2))
    assert frontier.sample_entropy([3, 1, 4, 5]) == pytest.approx(math.log(4))
    p = [0.5, 0.25, 0.25]
    assert frontier.sample_entropy([1, 1, 2, 3]) == pytest.approx(-sum(x * math.log(x) for x in p))


def test_quality_is_the_judges_exact_nll_per_generated_token():
    """gen PPL = exp(sum of -log p(x_t | x_<t) over the continuation tokens / their count), the per-token
    log-probabilities read off one plain forward pass of the ARM over prompt + continuation."""
    judge = build_model(config_by_name("tiny", vocab_size=50, causal=True, max_seq_len=64), seed=3).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 50, (n,), generator=g).tolist() for n in (3, 5, 1)]
    conts = [torch.randint(0, 50, (6,), generator=g).tolist() for _ in prompts]
    q = frontier.quality(judge, prompts, conts, batch_size=2)
    per_sample = []
    with torch.no_grad():
        for p, c in zip(prompts, conts):
            ids = torch.tensor([p + c])
            logp = torch.log_softmax(judge(ids).double(), -1)[0]  # (L, V)
            per_sample.append(-sum(float(logp[len(p) + i - 1, t]) for i, t in enumerate(c)) / len(c))
    nats = sum(per_sample) / len(per_sample)  # every continuation has 6 tokens: token-weighted = sample mean
    assert q["judge_nats_per_token"] == pytest.approx(nats, rel=1e-5)
    assert q["gen_ppl"] == pytest.approx(math.exp(nats), rel=1e-5)
    se = torch.tensor(per_sample).std().item() / math.sqrt(3)
    assert q["judge_nats_se"] == pytest.approx(se, rel=1e-4)
    assert q["entropy"] == pytest.approx(sum(frontier.sample_entropy(c) for c in conts) / 3)
    assert q["judge_nats_per_sample"] == pytest.approx(per_sample, rel=1e-5)


def test_cached_variants_get_a_paired_difference_to_their_uncached_twin():
    """Quality differences of the block caches are judged on the same prompts: the SE of the per-prompt
    differences, not either side's own SE (the README called cache effects "within the standard error" on the
    unpaired ones, which the prompts' spread dominates)."""
    base = dict(sampler="low_confidence", steps=4, block_length=2, threshold=None, cfg_scale=0.0)
    recs = [{"variant": "arm kv-cache", "cache": "prefix", "judge_nats_per_sample": [1.0, 2.0, 3.0]},
            {"variant": "a", **base, "cache": "none", "judge_nats_per_sample": [5.0, 9.0, 1.0]},
            {"variant": "b", **base, "cache": "dual", "judge_nats_per_sample": [5.5, 9.0, 1.25]},
            {"variant": "c", **{**base, "steps": 8}, "cache": "prefix", "judge_nats_per_sample": [0.0, 0.0, 0.0]}]
    frontier.add_cache_deltas(recs)
    d = [0.5, 0.0, 0.25]
    assert recs[2]["judge_nats_delta_vs_no_cache"] == pytest.approx(sum(d) / 3)
    assert recs[2]["judge_nats_delta_se"] == pytest.approx(float(np.std(d, ddof=1)) / math.sqrt(3))
    assert all("judge_nats_delta_vs_no_cache" not in r for r in (recs[0], recs[1], recs[3]))  # no twin: none


def test_command_measures_every_variant_and_the_reference_text(tmp_path, ckpts, prepared):
    out = tmp_path / "frontier.json"
    cmd = [sys.executable, "-m", "smdm.cli", "bench", "frontier", "--mdm", str(ckpts["mdm"]),
           "--arm", str(ckpts["ar"]), "--data", str(prepared), "--n", "3", "--prompt-length", "8",
           "--gen-length", "8", "--steps", "2", "8", "--batch-size", "2", "--device", "cpu", "--threads", "1",
           "--json", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    recs = json.loads(out.read_text())
    names = [r["variant"] for r in recs]
    assert names == ["arm kv-cache", "mdm ancestral S=2", "mdm ancestral S=8", "mdm low_confidence S=2",
                     "mdm low_confidence S=8", "reference text"]
    for line in names:
        assert line in p.stdout  # the table
    from smdm.benchmarks.sampler import validation_prompts

    prompts, refs = validation_prompts(str(prepared), 3, 8, 8)
    arm, _ = checkpoint.load(ckpts["ar"], device="cpu")
    for r in recs:
        assert len(r["samples"]) == 3 and all(len(s) == 8 for s in r["samples"])
        # the quality columns are those of the saved samples under the judge (the ARM twin)
        q = frontier.quality(arm, prompts, r["samples"])
        assert r["gen_ppl"] == pytest.approx(q["gen_ppl"], rel=1e-6)
        assert r["entropy"] == pytest.approx(q["entropy"])
    assert recs[-1]["samples"] == refs and "tokens_per_s" not in recs[-1]
    for r in recs[:-1]:
        assert r["generated_tokens"] == 3 * 8
        assert r["tokens_per_s"] == pytest.approx(24 / r["seconds"])
        assert r["ratio_vs_arm"] == pytest.approx(r["tokens_per_s"] / recs[0]["tokens_per_s"])
    # 3 prompts in batches of 2: two generate() calls per variant, S model calls each (ARM: one per token;
    # ancestral: at most S, a step that reveals nothing reuses the previous step's logits)
    fwd = {r["variant"]: r["forward_passes"] for r in recs[:-1]}
    assert fwd["arm kv-cache"] == 16 and fwd["mdm low_confidence S=2"] == 4 and fwd["mdm low_confidence S=8"] == 16
    assert 2 <= fwd["mdm ancestral S=2"] <= 4 and 2 <= fwd["mdm ancestral S=8"] <= 16
    assert recs[0]["environment"]["gen_length"] == 8


def test_same_seed_same_samples(ckpts, prepared):
    """Samples depend on (seed + prompt index), not on the batch split: batch 1 and batch 3 agree."""
    mdm, _ = checkpoint.load(ckpts["mdm"], device="cpu")
    arm, _ = checkpoint.load(ckpts["ar"], device="cpu")
    from smdm.benchmarks.sampler import validation_prompts

    prompts, refs = validation_prompts(str(prepared), 3, 8, 8)
    runs = [frontier.run(mdm, arm, arm, prompts, refs, gen_length=8, steps=[4], samplers=["ancestral"],
                         temperature=1.0, batch_size=b) for b in (1, 3)]
    runs += [frontier.run(mdm, None, arm, prompts, refs, gen_length=8, steps=[4], samplers=["low_confidence"],
                          block_length=4, caches=["prefix", "dual"], temperature=1.0, batch_size=b)
             for b in (1, 3)]
    for a, b in [*zip(*runs[:2]), *zip(*runs[2:])]:
        assert a["variant"] == b["variant"] and a["samples"] == b["samples"]
    assert [r["variant"] for r in runs[2]] == ["mdm low_confidence S=4 blocks 4 prefix-cache",
                                               "mdm low_confidence S=4 blocks 4 dual-cache", "reference text"]
    assert runs[0][1]["samples"] != runs[0][0]["samples"]  # the MDM and the ARM sample differently


def test_cache_refresh_variants(ckpts, prepared):
    """--cache dual:N is generate(cache="dual", cache_refresh=N), named as such, paired with the uncached twin;
    dual:1 rebuilds the kept K/V every pass, so its samples are the uncached ones (two layers: the plain dual
    cache is stale there)."""
    import argparse

    mdm, _ = checkpoint.load(ckpts["mdm"], device="cpu")
    from smdm.benchmarks.sampler import validation_prompts

    prompts, refs = validation_prompts(str(prepared), 3, 8, 8)
    caches = [frontier.cache_spec(c) for c in ("none", "dual:1", "dual:2")]
    recs = frontier.run(mdm, None, mdm, prompts, refs, gen_length=8, steps=[8], samplers=["low_confidence"],
                        block_length=4, caches=caches, temperature=1.0)
    assert [r["variant"] for r in recs[:3]] == ["mdm low_confidence S=8 blocks 4",
                                                "mdm low_confidence S=8 blocks 4 dual-cache refresh 1",
                                                "mdm low_confidence S=8 blocks 4 dual-cache refresh 2"]
    assert recs[1]["samples"] == recs[0]["samples"] and recs[2]["cache_refresh"] == 2
    assert recs[1]["judge_nats_delta_vs_no_cache"] == 0
    for bad in ("dual:0", "none:2", "dual:x", "all", "dual:", "none:"):
        with pytest.raises(argparse.ArgumentTypeError):
            frontier.cache_spec(bad)
    with pytest.raises(ValueError, match="dual-cache refresh 4: given twice"):
        frontier.variants([8], ["low_confidence"], 4, [frontier.cache_spec(c) for c in ("dual:4", "dual:04")])


@pytest.mark.parametrize("flags,msg", [
    ([], "give --arm"),
    (["--arm", "MDM"], "--arm {MDM} is an MDM"),
    (["--arm", "AR", "--judge", "OTHER"], "--judge {OTHER}: its tokenizer differs"),
    (["--arm", "AR", "--data", "/nonexistent"], "--data /nonexistent"),
    (["--arm", "/nonexistent"], "--arm /nonexistent"),
    (["--arm", "AR", "--n", "0"], "--n must be >= 1, got 0"),  # not "no document of 72+ tokens"
])
def test_errors_name_the_flag(ckpts, flags, msg, capsys):
    from smdm import cli

    names = {"MDM": str(ckpts["mdm"]), "AR": str(ckpts["ar"]), "OTHER": str(ckpts["other"])}
    flags = [names.get(f, f) for f in flags]
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "frontier", "--mdm", str(ckpts["mdm"]), "--device", "cpu", *flags])
    assert msg.format(**names) in str(e.value)


def test_bad_dtype_is_a_usage_error(ckpts, capsys):
    """--dtype names a torch dtype: a wrong one is argparse's error listing the choices, not an AttributeError
    from torch after the checkpoint loaded."""
    from smdm import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "frontier", "--mdm", str(ckpts["mdm"]), "--arm", str(ckpts["ar"]), "--device", "cpu",
                  "--dtype", "foo"])
    assert e.value.code == 2 and "invalid choice: 'foo'" in capsys.readouterr().err


@pytest.mark.parametrize("flags,msg", [
    (["--steps", "0"], "S=0: steps must be an int >= 1"),
    (["--samplers", "foo"], "unknown sampler 'foo'"),
    (["--block-length", "3"], "block_length=3 must divide gen_length=8"),
])
def test_bad_variants_fail_before_the_arm_baseline_runs(ckpts, flags, msg, capsys):
    """Every MDM variant's options are checked before the first variant (the ARM baseline) runs: before, a bad
    --steps / --samplers / --block-length failed only after the ARM had been timed (minutes on a real run)."""
    from smdm import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "frontier", "--mdm", str(ckpts["mdm"]), "--arm", str(ckpts["ar"]), "--device", "cpu",
                  "--n", "2", "--gen-length", "8", *flags])
    assert msg in str(e.value), str(e.value)
    assert "arm kv-cache:" not in capsys.readouterr().err  # no variant ran


def test_validation_prompts_read_litpkds_data(tmp_path, prepared, tiny_jsonl):
    """The prompts and reference text of `bench frontier` / `bench sampler --quality-data` from a LITPKDS
    dataset (lit-gpt's format, `smdm data import`) are those of the same text in smdm shards."""
    from smdm.benchmarks.sampler import validation_prompts
    from smdm.data_cli import prepare

    lit = tmp_path / "lit"
    prepare([str(tiny_jsonl)], lit, tokenizer=str(prepared / "tokenizer.json"), fmt="litpkds", val_fraction=0.1,
            shard_tokens=100_000, progress=False, log=lambda msg: None)
    prompts, refs = validation_prompts(str(lit), 3, 8, 8)
    assert (prompts, refs) == validation_prompts(str(prepared), 3, 8, 8) and len(prompts) == 3


def test_cache_quality_reports_the_paired_elbo_difference():
    from smdm.benchmarks.sampler import cache_quality

    model = build_model(config_by_name("tiny", vocab_size=50, max_seq_len=64), seed=1).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 50, (4,), generator=g).tolist() for _ in range(3)]
    with torch.no_grad():
        rows = cache_quality(model, prompts, None, 8, 4, 4, n_samples=4, seed=[0, 1, 2])
    assert [r["cache"] for r in rows] == ["none", "prefix", "dual"]
    assert rows[0]["elbo_delta_vs_no_cache"] == 0 and rows[0]["elbo_delta_se"] == 0
    for r in rows[1:]:  # unweighted means over prompts on both sides: the mean difference is their difference
        assert r["elbo_delta_vs_no_cache"] == pytest.approx(r["elbo_nats_per_token"] - rows[0]["elbo_nats_per_token"])
        assert r["elbo_delta_se"] >= 0


def test_default_data_not_here_is_an_error_asking_for_data(tmp_path, monkeypatch):
    """An MDM trained on the built-in corpus records no data path (train.data null: runs/data where `smdm train`
    ran); from another directory frontier and cfg said "--data runs/data: no such directory", an option the
    user never gave. Now: an error saying what is missing and to give --data."""
    from smdm.benchmarks.frontier import _default_data

    model = build_model(config_by_name("tiny", vocab_size=50, max_seq_len=64), seed=1)
    for data, what in ((None, r"the built-in corpus it was trained on \(runs/data\)"),
                       ("rel/data", "its training data rel/data")):
        step = checkpoint.save(tmp_path / f"m{data is None}", 1, model_state=model.state_dict(),
                               config={"model": model.config.to_dict(), "objective": "mdm", "train": {"data": data}},
                               train_state={"step": 1})
        monkeypatch.chdir(tmp_path)
        with pytest.raises(SystemExit, match=f"smdm bench cfg: error: no --data given, and {what} is not here"):
            _default_data(step, "smdm bench cfg")
        (tmp_path / (data or "runs/data")).mkdir(parents=True)
        assert _default_data(step) == (data or "runs/data")
    sft = checkpoint.save(tmp_path / "sft", 1, model_state=model.state_dict(),
                          config={"model": model.config.to_dict(), "objective": "mdm", "train": {"data": None},
                                  "sft": {"train": "pairs.jsonl"}}, train_state={"step": 1})
    with pytest.raises(SystemExit, match="was fine-tuned \\(--sft\\) and records no dataset: give --data"):
        _default_data(sft)  # runs/data exists here now: still not what it was trained on

# python -m pytest -q tests/test_harness.py
"""The lm-evaluation-harness adapter (smdm.harness) on a tiny trained MDM and its ARM twin, with local task
YAMLs over JSONL files the tests write (offline: no hub, no download). lm-eval runs in-process through
`lm_eval.simple_evaluate`, and once through `smdm eval harness` in a subprocess. Checked: multiple-choice
log-likelihoods and acc / acc_norm equal `smdm eval mc` on the same items (ELBO, chain rule, ARM), is_greedy
against its definitions, generate_until against `smdm.generate` (stop strings, batches of mixed prompt
lengths), loglikelihood_rolling against its windows (lm-eval's own window function for the ARM) and by hand,
the lazy import of lm_eval and the errors."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from smdm import checkpoint, evaluate, harness, sampling

SOUNDS = {"cat": "meows", "dog": "barks", "bird": "sings", "fish": "swims"}
MC_ITEMS = [{"context": f"the {a}", "choices": [f" {s}" for s in SOUNDS.values()], "label": i}
            for i, a in enumerate(SOUNDS)] + [
    {"context": "the dog ", "choices": ["barks .", "sings"], "label": 0},  # trailing space moves to the choice
    {"context": "", "choices": [" the", " meows . the"], "label": 0},  # empty context: [EOS]
]
GEN_ITEMS = [{"prompt": "the cat", "answer": " meows"}, {"prompt": "the fish swims . the dog", "answer": " barks"},
             {"prompt": "the bird sings . the cat meows . the bird", "answer": " sings"}]
ROLL_ITEMS = [{"text": "the cat meows . the dog barks ."},
              {"text": " ".join(f"the {a} {s} ." for a, s in list(SOUNDS.items()) * 8)}]  # 3 windows

ROOT = Path(__file__).resolve().parents[1]
CTX = 48  # the twins' context (max_seq_len)


def _lm_eval():
    """lm_eval, or a skip where it is not installed (a failure under CI on Python >= 3.10, where the test extra
    installs it)."""
    if os.environ.get("CI") and sys.version_info >= (3, 10):
        import lm_eval

        return lm_eval
    return pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install 'smdm[eval]')")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one torch thread is as fast and does not spin against the other jobs of a small machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No hub access for the whole module (set before datasets / huggingface_hub are first imported; the task
    YAMLs put the datasets cache in the test's tmp dir)."""
    with pytest.MonkeyPatch.context() as mp:
        for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.setenv(k, "1")
        yield


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """A tiny MDM and its ARM twin trained 40 steps on "the <animal> <sound> ." and saved again with a context
    of CTX tokens (RoPE is computed on the fly: the same weights; short rolling windows keep the test fast);
    their checkpoints hold the BPE tokenizer. And a task dir with a multiple-choice, a generate_until and a
    loglikelihood_rolling YAML."""
    from smdm.config import TrainConfig
    from smdm.data_cli import prepare
    from smdm.train import train

    root = tmp_path_factory.mktemp("harness")
    rnd = random.Random(0)
    docs = [f"the {a} {SOUNDS[a]} ." for a in (rnd.choice(list(SOUNDS)) for _ in range(400))]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    prepare([str(root / "docs.jsonl")], root / "data", vocab_size=300, val_fraction=0.2, shard_tokens=20000,
            progress=False, log=lambda m: None)
    for kind in ("mdm", "ar"):  # threads=1 as the module's fixture has set
        train(TrainConfig(config="tiny", data=str(root / "data"), out=str(root / kind), objective=kind,
                          max_steps=40, batch_size=8, seq_len=32, val_every=0, save_every=0, samples=0, threads=1))
    for kind in ("mdm", "ar"):
        model, _ = checkpoint.load(root / kind, device="cpu")
        checkpoint.save(root / f"{kind}-ctx", 1, model_state=model.state_dict(),
                        config={"model": {**model.config.to_dict(), "max_seq_len": CTX}, "objective": kind},
                        train_state={}, tokenizer_path=root / "data" / "tokenizer.json")
    tasks = root / "tasks"
    tasks.mkdir()
    cache = root / "hf-cache"
    for name, rows in (("mc", MC_ITEMS), ("gen", GEN_ITEMS), ("roll", ROLL_ITEMS)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    head = lambda name: (f"task: tiny_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"  # noqa: E731
                         f"    test: {root / (name + '.jsonl')}\n  cache_dir: {cache}\ntest_split: test\n")
    (tasks / "tiny_mc.yaml").write_text(head("mc") + """output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
""")
    (tasks / "tiny_gen.yaml").write_text(head("gen") + """output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs: {until: ["."], max_gen_toks: 8, do_sample: false}
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
""")
    (tasks / "tiny_roll.yaml").write_text(head("roll") + """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}
""")
    return {"root": root, "tasks": tasks, "mdm": root / "mdm-ctx", "ar": root / "ar-ctx"}


@pytest.fixture(scope="module")
def runs(twins, offline):
    """lm_eval.simple_evaluate by model name "smdm" (model_args as lm-eval's string), per-sample records kept:
    the ARM (2 rows / prompts per batch) and the MDM (ELBO, 8 samples, 64 rows / prompts per batch; steps and
    blocks for generation) on the three tasks, the MDM's chain rule with CFG on the multiple-choice task."""
    _lm_eval()
    import lm_eval.tasks

    harness.register()
    manager = lm_eval.tasks.TaskManager(include_path=str(twins["tasks"]), include_defaults=False)
    specs = {"ar": (f"ckpt={twins['ar']},batch_size=2", ["tiny_mc", "tiny_gen", "tiny_roll"]),
             "elbo": (f"ckpt={twins['mdm']},mc_samples=8,seed=3,batch_size=64,steps=4,block_length=4",
                      ["tiny_mc", "tiny_gen", "tiny_roll"]),
             "chain": (f"ckpt={twins['mdm']},method=chain,cfg=0.5", ["tiny_mc"])}
    out = {}
    for name, (args, tasks) in specs.items():
        out[name] = lm_eval.simple_evaluate(model="smdm", model_args=args + ",device=cpu", tasks=tasks,
                                            task_manager=manager, log_samples=True)
    return out


def _resps(run, task):
    """Per document (in order) the responses of its requests: [(ll, is_greedy), ...] or [text] or [ll]."""
    samples = sorted(run["samples"][task], key=lambda s: s["doc_id"])
    return [[r[0] for r in s["resps"]] for s in samples]


# ---- without lm_eval -------------------------------------------------------------------------------------------

def _python(code, env=None):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, **(env or {})})


def test_import_smdm_does_not_import_lm_eval():
    r = _python("import sys, argparse, smdm, smdm.harness, smdm.evaluate\n"
                "p = argparse.ArgumentParser(); smdm.evaluate.register(p)\n"
                "p.parse_args(['harness', '--ckpt', 'x', '--tasks', 't'])\n"
                "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lm_eval', 'datasets', 'torch')))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_missing_lm_eval_says_how_to_install(tmp_path):
    """lm_eval made unimportable (None in sys.modules): register() and the CLI name the extra to install."""
    r = _python("import sys; sys.modules['lm_eval'] = None\n"
                "import smdm.harness\n"
                "try:\n    smdm.harness.SmdmLM\nexcept ImportError as e:\n    print('ERR', e)\n"
                "sys.exit(smdm.harness.main(['--ckpt', 'x', '--tasks', 't']))")
    assert r.returncode == 2
    assert "ERR the lm-evaluation-harness adapter needs lm-eval (`pip install 'smdm[eval]'`)" in r.stdout
    assert "python -m smdm.harness: error:" in r.stderr and "pip install 'smdm[eval]'" in r.stderr
    r = _python("import sys; sys.modules['lm_eval'] = None\nfrom smdm import cli\n"
                "sys.exit(cli.main(['lm-eval', '--model', 'smdm', '--tasks', 't']))")
    assert r.returncode == 2, r.stderr
    assert "smdm lm-eval: error:" in r.stderr and "pip install 'smdm[eval]'" in r.stderr


def test_cut_at_stop():
    assert harness.cut_at_stop(" meows . the dog", ["."]) == " meows "
    assert harness.cut_at_stop("a b\nc. d", [".", "\n"]) == "a b"  # the earliest stop string of several
    assert harness.cut_at_stop("abc", ["x", ""]) == "abc"
    assert harness.cut_at_stop("abc", []) == "abc"


@pytest.mark.parametrize("n,budget,context", [(1, 5, 1), (4, 5, 1), (5, 5, 1), (13, 5, 1), (13, 6, 2),
                                              (30, 9, 4), (7, 8, 6)])
def test_rolling_windows(n, budget, context):
    """Each token predicted once, in order, given the tokens just before it; windows of at most `budget`
    tokens; for the ARM (budget = L + 1) exactly lm-eval's windows (get_rolling_token_windows, disjoint)."""
    tokens = list(range(100, 100 + n))
    wins = harness.rolling_windows(tokens, 7, budget, context)
    assert [t for _, p in wins for t in p] == tokens
    assert wins[0][0] == [7]
    for ctx, pred in wins:
        assert len(ctx) + len(pred) <= budget and len(ctx) >= 1
    for ctx, pred in wins[1:]:
        start = tokens.index(pred[0])
        assert ctx == tokens[start - len(ctx):start] and len(ctx) >= context
    _lm_eval()
    import lm_eval.utils

    theirs = [lm_eval.utils.make_disjoint_window(w)
              for w in lm_eval.utils.get_rolling_token_windows(tokens, 7, budget - 1, context)]
    assert wins == [(list(a), list(b)) for a, b in theirs]


# ---- multiple choice = smdm eval mc -----------------------------------------------------------------------------

@pytest.mark.parametrize("name,argv", [("ar", []), ("elbo", ["--n-samples", "8", "--seed", "3"]),
                                       ("chain", ["--method", "chain", "--cfg", "0.5"])])
def test_multiple_choice_equals_smdm_eval_mc(twins, runs, capsys, name, argv):
    """The same log-likelihood per choice (bit for bit: same pairs, seed, samples, row keys) and so the same
    acc and acc_norm as `smdm eval mc` on the same JSONL."""
    out = twins["root"] / f"mc-{name}.json"
    rc = evaluate.main(["mc", "--ckpt", str(twins["ar" if name == "ar" else "mdm"]), "--data",
                        str(twins["root"] / "mc.jsonl"), "--device", "cpu", "--json", str(out), *argv])
    assert rc == 0, capsys.readouterr().err
    mine = json.loads(out.read_text())["results"][0]
    got = runs[name]["results"]["tiny_mc"]
    lls = _resps(runs[name], "tiny_mc")
    assert [[ll for ll, _ in doc] for doc in lls] == [[-x for x in r["nll"]] for r in mine["records"]]
    assert got["acc,none"] == mine["acc"] and got["acc_norm,none"] == mine["acc_norm"]
    assert got["acc_stderr,none"] == pytest.approx(mine["acc_stderr"], rel=1e-12)
    if name == "ar":  # trained: the ARM reads the context (a check that the items are not trivially scored)
        assert mine["acc"] >= 4 / 6


def _instances(pairs, kind="loglikelihood"):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=p, idx=0) for p in pairs]


def test_is_greedy_matches_its_definitions(twins, offline):
    """ARM: argmax of every next-token distribution; MDM chain: argmax at each left-to-right step (guided with
    CFG); MDM ELBO: smdm.generate (low_confidence, temperature 0, one token per step) decodes the continuation;
    greedy=off: False."""
    _lm_eval()
    cls = harness.register()
    ar = cls(ckpt=str(twins["ar"]), device="cpu")
    tok = ar.tokenizer
    # continuations the trained ARM decodes greedily, and others
    prompts = ["the cat", "the dog", "the fish swims . the bird"]
    gen = sampling.generate(ar.model, [tok.encode(p).ids for p in prompts], gen_length=3, eos_id=0)
    pairs = [(p, tok.decode(g)) for p, g in zip(prompts, gen.tokens)] + [("the cat", " barks"), ("the", " dog")]
    enc = [evaluate.encode_pair(tok, c, d) for c, d in pairs]
    assert [d for _, d in enc[:3]] == gen.tokens  # the decoded text encodes back to the greedy tokens
    res = ar.loglikelihood(_instances(pairs))
    for (c, d), (ll, greedy) in zip(enc, res):
        x = torch.tensor(c + d)
        with torch.no_grad():
            logits = ar.model(x[None])[0]  # (L, V)
        want = all(int(logits[j - 1].argmax()) == x[j] for j in range(len(c), len(x)))
        assert greedy == want
        assert ll == pytest.approx(float(torch.log_softmax(logits.double(), -1)[
            torch.arange(len(c) - 1, len(x) - 1), x[len(c):]].sum()), rel=1e-5)
    assert [g for _, g in res] == [True, True, True, False, False]

    chain = cls(ckpt=str(twins["mdm"]), device="cpu", method="chain", cfg=0.5)
    mdm, mask = chain.model, chain.model.config.mask_id
    for (c, d), (_, greedy) in zip(enc, chain.loglikelihood(_instances(pairs))):
        x0, want = torch.tensor(c + d), True
        for j in range(len(d)):
            x = x0.clone()
            x[len(c) + j:] = mask
            xu = x.clone()
            xu[:len(c)] = mask
            with torch.no_grad():
                lc, lu = mdm(torch.stack([x, xu]))[:, len(c) + j]
            want &= int((lu + 1.5 * (lc - lu)).argmax()) == int(x0[len(c) + j])
        assert greedy == want

    elbo = cls(ckpt=str(twins["mdm"]), device="cpu", mc_samples=4, batch_size=2)
    dec = [(p, sampling.generate(mdm, [tok.encode(p).ids], gen_length=n, steps=n).tokens[0])
           for p in prompts[:2] for n in (1, 2)]
    pairs = [(p, tok.decode(g)) for p, g in dec if 0 not in g] + pairs[3:]  # decodes without EOS, and others
    res = elbo.loglikelihood(_instances(pairs))
    want = [sampling.generate(mdm, [c], gen_length=len(d), steps=len(d)).tokens[0] == d
            for c, d in (evaluate.encode_pair(tok, c, d) for c, d in pairs)]
    assert [g for _, g in res] == want and True in want and False in want
    off = cls(ckpt=str(twins["mdm"]), device="cpu", mc_samples=4, greedy="off")
    res_off = off.loglikelihood(_instances(pairs))
    assert [g for _, g in res_off] == [False] * len(pairs) and [ll for ll, _ in res_off] == [ll for ll, _ in res]
    count = cls(ckpt=str(twins["mdm"]), device="cpu", mc_samples=4, estimator="count")
    want = evaluate.score(mdm, [evaluate.encode_pair(tok, c, d) for c, d in pairs], n_samples=4, estimator="count")
    assert [ll for ll, _ in count.loglikelihood(_instances(pairs))] == pytest.approx((-want.nll).tolist(), rel=1e-6)
    assert count.get_model_info()["smdm_estimator"] == "count" and elbo.get_model_info()["smdm_estimator"] == "time"
    chain = cls(ckpt=str(twins["mdm"]), device="cpu", mc_samples=4, method="chain")  # rolling requests: the ELBO
    assert (chain.get_model_info()["smdm_mc_samples"], chain.get_model_info()["smdm_estimator"]) == (4, "time")



def test_empty_continuation_is_log_one(twins, offline):
    """An empty continuation (e.g. an empty choice string) is log p = 0 and greedy, as lm-eval's HF model
    returns it, without failing the whole request list; the other requests keep their own scores."""
    _lm_eval()
    cls = harness.register()
    for kw in ({"ckpt": str(twins["ar"])}, {"ckpt": str(twins["mdm"]), "mc_samples": 4},
               {"ckpt": str(twins["mdm"]), "method": "chain", "cfg": 0.5}):
        lm = cls(device="cpu", **kw)
        reqs = [("the cat", ""), ("the cat", " meows"), ("", ""), ("the dog", " barks")]
        res = lm.loglikelihood(_instances(reqs))
        assert res[0] == (0.0, True) and res[2] == (0.0, True)
        alone = lm.loglikelihood(_instances([reqs[1], reqs[3]]))
        assert [res[1], res[3]] == alone and all(ll < 0 for ll, _ in alone)

# ---- generate_until ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ar", "elbo"])
def test_generate_until_is_smdm_generate(twins, runs, name):
    """Each response is smdm.generate of that prompt alone (8 tokens, stopped at EOS, MDM: 4 steps in blocks
    of 4), decoded and cut at the first "."; batching the 3 prompts of different lengths (2 / 64 per batch)
    changes nothing; exact_match is the mean of response == answer."""
    model, tok = checkpoint.load(twins["ar" if name == "ar" else "mdm"], device="cpu")
    kw = {} if name == "ar" else dict(steps=4, block_length=4, seed=3)
    texts = [r[0] for r in _resps(runs[name], "tiny_gen")]
    fulls = [tok.decode(sampling.generate(model, [tok.encode(it["prompt"]).ids], gen_length=8, eos_id=0,
                                          **kw).tokens[0]) for it in GEN_ITEMS]
    assert texts == [f.split(".")[0] for f in fulls]
    if name == "ar":
        assert texts[0] == " meows " and fulls[0].startswith(" meows .")  # the trained twin; the stop string cut
    em = np.mean([t == it["answer"] for t, it in zip(texts, GEN_ITEMS)])
    assert runs[name]["results"]["tiny_gen"]["exact_match,none"] == em


def test_generate_until_options_and_errors(twins, offline):
    _lm_eval()
    cls = harness.register()
    ar = cls(ckpt=str(twins["ar"]), device="cpu", max_gen_toks=3)
    (text,) = ar.generate_until(_instances([("the dog", {"until": "zzz"})], "generate_until"))
    assert text == ar.tokenizer.decode(sampling.generate(ar.model, [ar.tokenizer.encode("the dog").ids],
                                                         gen_length=3, eos_id=0).tokens[0])
    sampled = ar.generate_until(_instances([("the dog", {"until": [], "do_sample": True, "temperature": 5.0,
                                                         "max_gen_toks": 6})] * 2, "generate_until"))
    assert sampled[0] == sampled[1]  # one seed: the same draw
    with pytest.raises(ValueError, match=r"request 0: unsupported generation argument\(s\) \['num_beams'\]"):
        ar.generate_until(_instances([("the", {"until": ["."], "num_beams": 2})], "generate_until"))
    with pytest.raises(ValueError, match=f"max_gen_toks={CTX} leaves no room"):
        ar.generate_until(_instances([("the", {"max_gen_toks": CTX})], "generate_until"))


def test_generate_until_takes_the_checkpoints_schedule_and_threshold(twins, offline, tmp_path):
    """The MDM generated with the linear schedule whatever it was trained with (`smdm generate` takes the
    checkpoint's), and sampler=threshold could not run (no threshold argument)."""
    _lm_eval()
    cls = harness.register()
    model, tok = checkpoint.load(twins["mdm"], device="cpu")
    ck = checkpoint.save(tmp_path / "cos", 1, model_state=model.state_dict(), train_state={},
                         config={"model": model.config.to_dict(), "objective": "mdm", "train": {"schedule": "cosine"}},
                         tokenizer_path=twins["root"] / "data" / "tokenizer.json")
    req = _instances([("the dog", {"until": []})], "generate_until")
    for kw, want in (({}, dict(schedule="cosine")), ({"schedule": "linear"}, dict(schedule="linear")),
                     ({"sampler": "threshold", "threshold": "0.2"},
                      dict(schedule="cosine", sampler="threshold", threshold=0.2))):
        lm = cls(ckpt=str(ck), device="cpu", max_gen_toks=8, steps=4, **kw)
        assert lm.schedule == want["schedule"]
        (text,) = lm.generate_until(req)
        assert text == tok.decode(sampling.generate(model, [tok.encode("the dog").ids], gen_length=8, steps=4,
                                                    eos_id=0, **want).tokens[0])
    for kw, msg in (({"sampler": "threshold"}, "sampler=threshold needs it"),
                    ({"threshold": 0.5}, "the other samplers take none"),
                    ({"schedule": "nope"}, "schedule='nope'")):
        with pytest.raises(ValueError, match=msg):
            cls(ckpt=str(ck), device="cpu", **kw)


# ---- loglikelihood_rolling --------------------------------------------------------------------------------------

def test_rolling_loglikelihood(twins, runs):
    """ARM: the short text's value is the exact log p(text | EOS) of one forward pass; the long one (3 windows)
    the sum of exact window scores. MDM: the sum of `evaluate.score` ELBOs of its windows (same seed and
    samples). lm-eval's bits_per_byte is -sum(ll) / (bytes ln 2) of those values."""
    model, tok = checkpoint.load(twins["ar"], device="cpu")
    toks = [tok.encode(it["text"]).ids for it in ROLL_ITEMS]
    assert model.config.max_seq_len == CTX and len(toks[1]) > 2 * CTX
    lls = [r[0] for r in _resps(runs["ar"], "tiny_roll")]
    x = torch.tensor([0] + toks[0])
    with torch.no_grad():
        logp = torch.log_softmax(model(x[None])[0].double(), -1)  # (L, V)
    assert lls[0] == pytest.approx(float(logp[torch.arange(len(x) - 1), x[1:]].sum()), rel=1e-6)
    wins = harness.rolling_windows(toks[1], 0, model.config.max_seq_len + 1)
    assert len(wins) >= 3
    assert lls[1] == pytest.approx(-evaluate.score(model, wins).nll.sum(), rel=1e-9)
    nbytes = sum(len(it["text"].encode()) for it in ROLL_ITEMS)
    bpb = runs["ar"]["results"]["tiny_roll"]["bits_per_byte,none"]
    assert bpb == pytest.approx(-sum(lls) / nbytes / math.log(2), rel=1e-9)

    mdm, _ = checkpoint.load(twins["mdm"], device="cpu")
    lls = [r[0] for r in _resps(runs["elbo"], "tiny_roll")]
    for ll, t in zip(lls, toks):
        wins = harness.rolling_windows(t, 0, mdm.config.max_seq_len)
        assert all(len(c) + len(p) <= mdm.config.max_seq_len for c, p in wins)
        s = evaluate.score(mdm, wins, n_samples=8, seed=3)
        assert ll == -s.nll.sum() and ll < 0


# ---- the CLI ----------------------------------------------------------------------------------------------------

def test_cli_subprocess(twins, runs, tmp_path):
    """`smdm eval harness` in a real process, offline: lm-eval's table, the JSON, the same acc as in-process;
    the MDM-only options are left out for the ARM (as in `smdm eval mc`)."""
    out = tmp_path / "h.json"
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}  # a tiny model: one thread (see one_thread)
    r = subprocess.run([sys.executable, "-m", "smdm.cli", "eval", "harness", "--ckpt", str(twins["ar"]),
                        "--tasks", "tiny_mc", "--include-path", str(twins["tasks"]), "--limit", "2",
                        "--device", "cpu", "--json", str(out), "--method", "chain", "--cfg", "0.5"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, **env})
    assert r.returncode == 0, r.stderr
    assert "(ARM, ar)" in r.stdout and "tiny_mc" in r.stdout and "acc_norm" in r.stdout
    doc = json.loads(out.read_text())
    res = doc["results"][0]
    assert doc["tasks"] == ["tiny_mc"] and res["model"] == "ARM"
    assert res["n-samples"]["tiny_mc"]["effective"] == 2
    mine = _resps(runs["ar"], "tiny_mc")[:2]
    acc = np.mean([int(np.argmax([ll for ll, _ in doc_])) == it["label"] for doc_, it in zip(mine, MC_ITEMS)])
    assert res["results"]["tiny_mc"]["acc,none"] == acc
    assert res["config"]["smdm_ckpt"] == str(twins["ar"])


def test_lm_eval_own_cli(twins, runs, tmp_path):
    """`smdm lm-eval ...` is lm-eval's own command line (its option names, its output files) with the model
    "smdm" registered: the ARM on the multiple-choice task in a real process, the same acc and per-sample
    log-likelihoods as in-process. (One run: lm-eval's CLI first indexes all its default task YAMLs, 13,986
    files in lm-eval 0.4.13: 29–47 s of this test on the 2-core machine.)"""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "cache")}

    out = tmp_path / "out"
    argv = ["--model", "smdm", "--model_args", f"ckpt={twins['ar']}", "--device", "cpu", "--batch_size", "2",
            "--tasks", "tiny_mc", "--include_path", str(twins["tasks"]), "--limit", "3", "--output_path", str(out),
            "--log_samples"]
    r = subprocess.run([sys.executable, "-m", "smdm.cli", "lm-eval", *argv], capture_output=True, text=True,
                       cwd=ROOT, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tiny_mc" in r.stdout and "acc_norm" in r.stdout
    results = list(out.rglob("results_*.json"))
    samples = list(out.rglob("samples_tiny_mc_*.jsonl"))
    assert len(results) == 1 and len(samples) == 1, sorted(out.rglob("*"))
    # lm-eval names the folder after pretrained=, which smdm adds from ckpt= (else one random name for all models)
    assert results[0].parent.name.endswith(twins["ar"].name), results[0]
    mine = _resps(runs["ar"], "tiny_mc")[:3]
    acc = np.mean([int(np.argmax([ll for ll, _ in d])) == it["label"] for d, it in zip(mine, MC_ITEMS)])
    assert json.loads(results[0].read_text())["results"]["tiny_mc"]["acc,none"] == acc
    got = sorted((json.loads(line) for line in samples[0].read_text().splitlines()), key=lambda s: s["doc_id"])
    assert [[float(r[0][0]) for r in s["resps"]] for s in got] == [[ll for ll, _ in d] for d in mine]


def test_lm_eval_cli_defaults_to_the_cpu_without_cuda(monkeypatch, twins):
    """lm-eval's own default device is cuda:0, which the adapter cannot tell from one asked for: without CUDA
    `smdm lm-eval --model smdm ...` as the README writes it (no --device) must run on the CPU, not fail."""
    _lm_eval()
    import lm_eval.__main__
    import torch

    seen = []
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: seen.append(sys.argv[1:]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ma = f"ckpt={twins['ar']},pretrained={twins['ar']}"  # with pretrained= given, smdm adds none
    run = ["--model", "smdm", "--model_args", ma, "--tasks", "t", "--batch_size", "4"]
    for argv, want in [(run, run + ["--device", "cpu"]), (run + ["--device", "cuda:1"], run + ["--device", "cuda:1"]),
                       (run + ["--device=meta"], run + ["--device=meta"]), (["ls", "tasks"], ["ls", "tasks"])]:
        assert harness.lm_eval_main(argv) == 0
        assert seen.pop() == want
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # with CUDA: lm-eval's default stands
    assert harness.lm_eval_main(run) == 0 and seen.pop() == run


def test_lm_eval_cli_batch_size_defaults_to_the_adapters(monkeypatch, twins):
    """lm-eval's --batch_size defaults to 1 and reaches the adapter as asked for: without one (on the command line
    or in --model_args) `smdm lm-eval` passes the adapter's documented default, 16 rows."""
    _lm_eval()
    import lm_eval.__main__
    import torch

    seen = []
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: seen.append(sys.argv[1:]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ma = f"ckpt={twins['ar']},pretrained={twins['ar']}"  # with pretrained= given, smdm adds none
    run = ["--model", "smdm", "--model_args", ma, "--tasks", "t"]
    for argv, want in [(run, run + ["--batch_size", "16"]), (run + ["--batch_size", "2"], run + ["--batch_size", "2"]),
                       (["--model", "smdm", "--model_args", f"{ma},batch_size=3", "--tasks", "t"],
                        ["--model", "smdm", "--model_args", f"{ma},batch_size=3", "--tasks", "t"]),
                       (["ls", "tasks"], ["ls", "tasks"])]:
        assert harness.lm_eval_main(argv) == 0
        assert seen.pop() == want


def test_cli_errors(twins, offline, capsys):
    _lm_eval()
    base = ["harness", "--ckpt", str(twins["mdm"]), "--device", "cpu", "--include-path", str(twins["tasks"])]
    for extra, msg in [(["--tasks", " , "], "names no task"),
                       (["--tasks", "tiny_mc", "--method", "ar"], "the MDM takes elbo or chain"),
                       (["--tasks", "tiny_mc", "--cfg", "-1"], "cfg=-1.0: expected a finite number >= 0"),
                       (["--tasks", "tiny_mc", "--ckpt", str(twins["root"] / "none")], "does not exist")]:
        assert evaluate.main(base + extra) == 2
        assert msg in capsys.readouterr().err, msg
    rc = evaluate.main(["harness", "--ckpt", str(twins["ar"]), "--tasks", "t", "--include-path",
                        str(twins["root"] / "nope")])
    assert rc == 2 and "--include-path" in capsys.readouterr().err
    # a --json in a missing directory: said when the command line is read, not after every model has run
    with pytest.raises(SystemExit) as e:
        evaluate.main(base + ["--tasks", "tiny_mc", "--json", str(twins["root"] / "nope" / "r.json")])
    assert e.value.code == 2 and "argument --json" in capsys.readouterr().err


def test_registered_class_and_model_argument_errors(twins, offline):
    _lm_eval()
    import lm_eval.api.model
    import lm_eval.api.registry

    cls = harness.register()
    assert harness.SmdmLM is cls and harness.register() is cls and issubclass(cls, lm_eval.api.model.LM)
    assert lm_eval.api.registry.get_model("smdm") is cls
    assert "hf" in lm_eval.api.registry.model_registry  # lm-eval's own names are still there
    ck = str(twins["mdm"])
    for kw, msg in [({}, "ckpt is required"),
                    ({"ckpt": ck, "bogus": 1}, "unknown smdm model argument(s): bogus"),
                    ({"ckpt": ck, "method": "ar"}, "the MDM takes elbo or chain"),
                    ({"ckpt": ck, "mc_samples": 1}, "mc_samples=1: expected an integer >= 2"),
                    ({"ckpt": ck, "estimator": "llada"}, "estimator='llada': expected one of time, count"),
                    ({"ckpt": str(twins["ar"]), "estimator": "count"}, "applies to the MDM only"),
                    ({"ckpt": ck, "cfg": -1}, "cfg=-1: expected a finite number >= 0"),
                    ({"ckpt": ck, "greedy": "yes"}, "greedy='yes': expected one of auto, decode, off"),
                    ({"ckpt": ck, "sampler": "beam"}, "sampler='beam'"),
                    ({"ckpt": ck, "batch_size": "auto"}, "batch_size='auto': expected an integer >= 1"),
                    ({"ckpt": ck, "rolling_context": CTX - 1}, "leaves no token to predict"),
                    ({"ckpt": str(twins["ar"]), "greedy": "decode"}, "the ARM's is_greedy is exact"),
                    ({"ckpt": str(twins["root"] / "none")}, "does not exist")]:
        with pytest.raises((ValueError, TypeError)) as e:
            cls(device="cpu", **kw)
        assert msg in str(e.value), (kw, str(e.value))
    lm = cls(ckpt=ck, device="cpu", mc_samples=2)
    with pytest.raises(ValueError, match=f"request 0: the continuation has {CTX} tokens"):
        lm.loglikelihood(_instances([("the", " cat" * CTX)]))
    long = " the dog barks ." * 12 + " the cat"  # 50 tokens: cut on the left to fit CTX with the continuation
    ((ll, _),) = lm.loglikelihood(_instances([(long, " meows")]))
    ctx, cont = evaluate.encode_pair(lm.tokenizer, long, " meows")
    assert len(ctx) + len(cont) > CTX
    assert ll == -evaluate.score(lm.model, [(ctx[-(CTX - len(cont)):], cont)], n_samples=2).nll[0]


def test_arm_model_args_name_the_unused_mdm_options(twins, capsys):
    """An ARM twin in `smdm eval harness` leaves the MDM-only options out of its model arguments; a note names
    them (before: dropped in silence). An MDM's run has no note. --limit must be > 0 (was lm-eval's islice
    error for -1)."""
    import argparse

    p = argparse.ArgumentParser()
    harness.add_arguments(p)
    args = p.parse_args(["--ckpt", "x", "--tasks", "t", "--cfg", "1", "--method", "chain"])
    kw = harness.model_args(args, twins["ar"])
    assert "cfg" not in kw and "method" not in kw
    err = capsys.readouterr().err
    assert "is an autoregressive model: --method chain, --cfg 1.0 apply to the MDM only" in err, err
    kw = harness.model_args(args, twins["mdm"])
    assert kw["cfg"] == 1.0 and kw["method"] == "chain" and "note" not in capsys.readouterr().err
    with pytest.raises(SystemExit):
        p.parse_args(["--ckpt", "x", "--tasks", "t", "--limit", "-1"])
    assert "argument --limit: must be > 0" in capsys.readouterr().err


def test_lm_eval_cli_names_a_missing_checkpoint(twins, capsys):
    """`smdm lm-eval --model_args ckpt=MISSING`: one error line naming it, exit 2 (was a CheckpointError traceback
    from inside lm-eval, exit 1), in both spellings of the option."""
    _lm_eval()
    missing = twins["root"] / "none"
    for argv in (["--model_args", f"mc_samples=4,ckpt={missing}"], [f"--model_args=ckpt={missing}"]):
        assert harness.lm_eval_main(["--model", "smdm", *argv, "--tasks", "t"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("smdm lm-eval: error: --model_args ckpt: ") and str(missing) in err, err


def test_lm_eval_main_names_the_output_folder_and_says_adapter_errors_in_one_line(twins, monkeypatch, capsys):
    """A bad model argument ended `smdm lm-eval` in ~30 lines of traceback (exit 1); `smdm eval harness`
    says the same in one line, exit 2."""
    _lm_eval()
    import lm_eval.__main__

    seen = []

    def cli_evaluate():
        seen.append(list(sys.argv))
        harness.register()(ckpt=str(twins["mdm"]), device="cpu", bogus=1)

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", cli_evaluate)
    rc = harness.lm_eval_main(["--model", "smdm", "--model_args", f"ckpt={twins['mdm']},bogus=1", "--tasks", "x"])
    assert rc == 2
    assert capsys.readouterr().err.strip() == ("smdm lm-eval: error: unknown smdm model argument(s): bogus (known: "
                                               "ckpt, device, batch_size, method, mc_samples, estimator, cfg, seed, "
                                               "greedy, rolling_context, steps, block_length, sampler, threshold, "
                                               "schedule, "
                                               "temperature, max_gen_toks, pretrained)")
    i = seen[0].index("--model_args")
    assert seen[0][i + 1] == f"ckpt={twins['mdm']},bogus=1,pretrained={twins['mdm']}"
    cls = harness.register()
    assert cls(pretrained=str(twins["mdm"]), device="cpu").ckpt == str(twins["mdm"])
    with pytest.raises(harness.ModelArgumentError, match="differ"):
        cls(ckpt=str(twins["mdm"]), pretrained=str(twins["ar"]), device="cpu")

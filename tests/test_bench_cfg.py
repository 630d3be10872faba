# python -m pytest -q tests/test_bench_cfg.py
"""`smdm bench cfg`: the items against their definition, the ARM's guided score against a plain forward pass
per pair, the accuracy columns against hand-made scores, and a real run of the command on saved checkpoints
(every record recomputed from `smdm.evaluate.score`), plus its errors."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from smdm import checkpoint
from smdm.benchmarks import cfg as C
from smdm.evaluate import eos_id_of, score
from smdm.model import build_model, config_by_name


def _docs(seed=0, n=12):
    g = np.random.default_rng(seed)
    return [g.integers(0, 40, int(g.integers(5, 40))) for _ in range(n)]


def test_items_are_cut_documents_with_foreign_distractors():
    docs = _docs()
    items = C.make_items(docs, 6, 4, 3, 2, seed=1)
    again = C.make_items(docs, 6, 4, 3, 2, seed=1)
    assert again.contexts == items.contexts and again.choices == items.choices
    assert np.array_equal(again.labels, items.labels) and np.array_equal(again.where, items.where)
    assert len(items.labels) == 6 and len({int(i) for i, _ in items.where}) == 6  # one item per document
    for ctx, chs, label, (i, cut) in zip(items.contexts, items.choices, items.labels, items.where):
        d = docs[i].tolist()
        assert len(d) >= 7 and ctx == d[cut:cut + 4] and chs[label] == d[cut + 4:cut + 7]
        assert len(chs) == 3 and all(len(c) == 3 for c in chs)
        for j, c in enumerate(chs):
            if j != label:  # a span of another document past its first 4 tokens (as the answer), never the answer
                assert c != chs[label]
                assert any(k != i and any(docs[k][a:a + 3].tolist() == c for a in range(4, len(docs[k]) - 2))
                           for k in range(len(docs)))
    assert set(C.make_items(docs, 12, 4, 3, 2, seed=2).labels.tolist()) == {0, 1, 2}
    short = [np.arange(10) + 10 * k for k in range(3)] + [np.arange(9)]
    with pytest.raises(ValueError, match="3 validation documents have 10\\+ tokens; the items need at least 4"):
        C.make_items(short, 6, 6, 4, 3)
    assert len(C.make_items(short, 6, 6, 4, 2).labels) == 3  # fewer items than asked: one per document
    # fewer documents than items: several non-overlapping windows per document, spread evenly (2 or 3 each)
    g = np.random.default_rng(3)
    long = [g.integers(0, 40, 60) for _ in range(5)]
    items = C.make_items(long, 12, 6, 4, 2)
    assert len(items.labels) == 12 and np.array_equal(items.groups, items.where[:, 0])
    for i in range(5):
        cuts = sorted(int(c) for k, c in items.where if k == i)
        assert 2 <= len(cuts) <= 3 and all(b - a >= 10 for a, b in zip(cuts, cuts[1:]))
        for k in np.flatnonzero(items.where[:, 0] == i):
            c = int(items.where[k, 1])
            assert items.contexts[k] == long[i][c:c + 6].tolist()
            assert items.choices[k][items.labels[k]] == long[i][c + 6:c + 10].tolist()
    with pytest.raises(ValueError, match="found only 0 distinct 4-token spans unlike the answer"):
        C.make_items([np.full(12, 7)] * 5, 2, 6, 4, 2)  # every span is the answer: an error, not a hang


def test_same_document_distractors_come_from_outside_the_window():
    g = np.random.default_rng(5)
    docs = [g.integers(0, 50, int(n)) for n in (40, 80, 25, 120)]  # 25 < 6 + 4 + 6 + 3 * 4: too short here
    items = C.make_items(docs, 8, 6, 4, 3, seed=2, source="same")
    assert len(items.labels) == 8 and set(items.groups.tolist()) <= {0, 1, 3}
    for chs, label, (i, cut) in zip(items.choices, items.labels, items.where):
        for j, c in enumerate(chs):
            if j != label:
                spans = [a for a in range(6, len(docs[i]) - 3) if docs[i][a:a + 4].tolist() == c
                         and (a + 4 <= cut or a >= cut + 10)]
                assert spans and c != chs[label]
    with pytest.raises(ValueError, match="0 validation documents have 28\\+ tokens; the items need at least one"):
        C.make_items([np.arange(27)], 1, 6, 4, 3, source="same")
    with pytest.raises(ValueError, match="--distractors-from must be one of"):
        C.make_items(docs, 1, 6, 4, 3, source="mine")


def test_stderr_is_clustered_by_document():
    x = np.array([1, 1, 0, 0, 1, 0.0])
    assert C.stderr(x) == pytest.approx(x.std(ddof=1) / math.sqrt(6))
    assert C.stderr(x, np.arange(6)) == pytest.approx(C.stderr(x))
    groups = np.array([7, 7, 3, 3, 9, 9])  # residual sums per group: 1, -1, 0 (mean 0.5)
    assert C.stderr(x, groups) == pytest.approx(math.sqrt(3 / 2 * 2) / 6)
    assert math.isnan(C.stderr(x, np.zeros(6))) and math.isnan(C.stderr(x[:1]))


def test_arm_guided_nll_is_the_contrast_of_two_plain_forward_passes():
    """w = 0: exactly `smdm.evaluate.score`'s -log p; w > 0: -log softmax(u + (w + 1)(c - u)) summed over the
    continuation, c the logits after the context, u after the lone prefix; the same bits in any batch."""
    arm = build_model(config_by_name("tiny", vocab_size=41, causal=True, max_seq_len=64), seed=4).eval()
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randint(0, 40, (int(n),), generator=g).tolist(), torch.randint(0, 40, (k,), generator=g).tolist())
             for n, k in ((3, 4), (7, 2), (1, 5), (5, 4), (2, 1))]
    out = C.arm_guided_nll(arm, pairs, [0.0, 1.5], [39], batch_size=2)
    exact = score(arm, pairs, batch_size=3).nll
    np.testing.assert_allclose(out[0.0], exact, rtol=1e-12)  # w = 0 is the exact score, guided weights or not
    np.testing.assert_allclose(C.arm_guided_nll(arm, pairs, [0.0], [39])[0.0], exact, rtol=1e-12)
    with pytest.raises(ValueError, match="pair 1: the context and the continuation need a token each, got 0 and 2"):
        C.arm_guided_nll(arm, [pairs[0], ([], [1, 2])], [0.0], [39])
    with pytest.raises(ValueError, match="uncond_prefix is empty"):
        C.arm_guided_nll(arm, pairs, [1.0], [])
    with torch.no_grad():
        for (ctx, cont), got in zip(pairs, out[1.5]):
            c = arm(torch.tensor([ctx + cont]))[0, len(ctx) - 1:-1].double()
            u = arm(torch.tensor([[39] + cont]))[0, :-1].double()
            lp = torch.log_softmax(u + 2.5 * (c - u), -1)
            assert got == pytest.approx(-sum(float(lp[i, t]) for i, t in enumerate(cont)), rel=1e-4)
    one = C.arm_guided_nll(arm, pairs, [0.0, 1.5], [39], batch_size=1)
    assert all(np.array_equal(one[w], out[w]) for w in out)  # batch-invariant logits
    assert not np.allclose(out[1.5], out[0.0])


def test_accuracy_and_paired_differences():
    items = C.Items(contexts=[[1]] * 4, choices=[[[1], [2], [3]]] * 4, labels=np.array([0, 1, 2, 0]),
                    where=np.zeros((4, 2), np.int64))
    w0 = np.array([1, 2, 3, 5, 1, 6, 1, 2, 3, 1, 2, 3.0])  # picks 0, 1, 0, 0: right, right, wrong, right
    w1 = np.array([3, 2, 1, 2, 1, 6, 4, 2, 1, 3, 2, 1.0])  # picks 2, 1, 2, 2: wrong, right, right, wrong
    assert C.accuracy(w0, items).tolist() == [1, 1, 0, 1]
    recs = C.records_for("mdm", {0.0: w0, 1.0: w1}, items)
    assert [r["acc"] for r in recs] == [0.75, 0.5]
    assert recs[0]["acc_stderr"] == pytest.approx(np.std([1, 1, 0, 1], ddof=1) / 2)
    assert "acc_delta_vs_w0" not in recs[0] and "acc_norm" not in recs[0]
    assert recs[1]["acc_delta_vs_w0"] == pytest.approx(-0.25)
    assert recs[1]["acc_delta_stderr"] == pytest.approx(np.std([-1, 0, 1, -1], ddof=1) / 2)
    text = C.table(recs, 1 / 3)
    assert "0.750" in text and "-0.250" in text and "chance 0.333" in text


def _bench(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "smdm.cli", "bench", "cfg", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_command_scores_every_weight_for_both_models(tmp_path, ckpts, prepared):
    out = tmp_path / "cfg.json"
    p = _bench("--mdm", str(ckpts["mdm"]), "--arm", str(ckpts["ar"]), "--data", str(prepared), "--n", "5",
               "--context", "8", "--choice", "4", "--distractors", "2", "--cfg", "1.5", "--n-samples", "3",
               "--batch-size", "7", "--json", str(out))
    assert p.returncode == 0, p.stderr
    recs = json.loads(out.read_text())
    assert [(r["model"], r["cfg"]) for r in recs] == [("mdm", 0.0), ("mdm", 1.5), ("arm", 0.0), ("arm", 1.5)]
    items = C.load_items(str(prepared), 5, 8, 4, 2, seed=0)
    pairs = C.pairs_of(items)
    assert len(pairs) == 15 and recs[0]["labels"] == items.labels.tolist()
    mdm, tok = checkpoint.load(ckpts["mdm"], device="cpu")
    arm, _ = checkpoint.load(ckpts["ar"], device="cpu")
    want = {("mdm", w): score(mdm, pairs, n_samples=3, cfg=w, batch_size=5).nll for w in (0.0, 1.5)}
    eos = eos_id_of(tok)
    want.update({("arm", w): v for w, v in C.arm_guided_nll(arm, pairs, [0.0, 1.5], [eos]).items()})
    for r in recs:
        np.testing.assert_allclose(r["nll"], want[r["model"], r["cfg"]], rtol=1e-6)
        hits = C.accuracy(np.array(r["nll"]), items)
        assert r["acc"] == pytest.approx(hits.mean()) and r["n"] == 5
        assert (r["cfg"] == 0.0) == ("acc_delta_vs_w0" not in r)
        assert f"{r['acc']:.3f}" in p.stdout
    assert recs[1]["nll"] != recs[0]["nll"] and recs[3]["nll"] != recs[2]["nll"]
    assert "chance 0.333" in p.stdout and math.isfinite(recs[1]["acc_delta_stderr"])
    # --method chain: the exact chain-rule score with guidance, MDM records only without --arm
    p = _bench("--mdm", str(ckpts["mdm"]), "--data", str(prepared), "--n", "5", "--context", "8", "--choice", "4",
               "--distractors", "2", "--cfg", "1.5", "--method", "chain", "--json", str(out))
    assert p.returncode == 0, p.stderr
    recs = json.loads(out.read_text())
    assert [(r["model"], r["cfg"], r["method"]) for r in recs] == [("mdm", 0.0, "chain"), ("mdm", 1.5, "chain")]
    for r in recs:
        np.testing.assert_allclose(r["nll"], score(mdm, pairs, method="chain", cfg=r["cfg"]).nll, rtol=1e-6)


def test_mc_file_scores_equal_smdm_eval_mc(tmp_path, ckpts, prepared, tiny_texts):
    """`--mc FILE`: questions with 2 to 4 choices in `smdm eval mc`'s format; the MDM's acc and acc_norm at each
    weight and the ARM's at w = 0 are those of `smdm.evaluate.evaluate_mc` (the oracle), an empty context
    stands for EOS, and --n takes the first N questions."""
    from smdm.evaluate import evaluate_mc, read_mc

    words = " ".join(tiny_texts).split()
    g = np.random.default_rng(0)
    rows = []
    for q in range(9):
        k = 2 + q % 3
        ctx = "" if q == 4 else " ".join(words[int(g.integers(0, len(words) - 6)):][:6]) + " "
        choices = [" ".join(words[a:a + int(g.integers(1, 4))]) for a in g.integers(0, len(words) - 4, k)]
        rows.append({"context": ctx, "choices": choices, "label": int(g.integers(0, k))})
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cfg.json"
    p = _bench("--mdm", str(ckpts["mdm"]), "--arm", str(ckpts["ar"]), "--mc", str(mc), "--n", "8", "--cfg", "1.5",
               "--n-samples", "3", "--estimator", "count", "--json", str(out))
    assert p.returncode == 0, p.stderr
    recs = json.loads(out.read_text())
    assert [(r["model"], r["cfg"]) for r in recs] == [("mdm", 0.0), ("mdm", 1.5), ("arm", 0.0), ("arm", 1.5)]
    assert recs[0]["n"] == 8 and recs[0]["labels"] == [r["label"] for r in rows[:8]]
    mdm, tok = checkpoint.load(ckpts["mdm"], device="cpu")
    arm, _ = checkpoint.load(ckpts["ar"], device="cpu")
    items = read_mc(mc, limit=8)
    for r in recs[:3]:
        model = arm if r["model"] == "arm" else mdm
        kw = {} if r["model"] == "arm" else {"n_samples": 3, "cfg": r["cfg"], "estimator": "count"}
        assert r.get("estimator") == (None if r["model"] == "arm" else "count")
        want = evaluate_mc(model, tok, items, eos_id=eos_id_of(tok), **kw)
        assert (r["acc"], r["acc_norm"]) == (want["acc"], want["acc_norm"]), r["model"]
        np.testing.assert_allclose(r["nll"], [x for rec in want["records"] for x in rec["nll"]], rtol=1e-6)
    assert recs[3]["nll"] != recs[2]["nll"] and "acc_norm_delta_vs_w0" in recs[3]
    chance = np.mean([1 / len(r["choices"]) for r in rows[:8]])
    assert f"chance {chance:.3f}" in p.stdout and "acc_norm" in p.stdout
    p = _bench("--mdm", str(ckpts["mdm"]), "--mc", str(mc), "--data", str(prepared))
    assert p.returncode == 1 and "give --mc FILE or --data DIR, not both" in p.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "a", "choices": ["b"], "label": 0}) + "\n")
    p = _bench("--mdm", str(ckpts["mdm"]), "--mc", str(bad))
    assert p.returncode != 0 and f"{bad}:1: field 'choices'" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("args, words", [
    (["--mdm", "AR"], "--mdm .* is an autoregressive checkpoint"),
    (["--mdm", "MDM", "--arm", "MDM"], "--arm .* is an MDM; it must be autoregressive"),
    (["--mdm", "MDM", "--arm", "OTHER"], "its tokenizer differs"),
    (["--mdm", "MDM", "--cfg", "-1"], "--cfg weights must be finite and >= 0"),
    (["--mdm", "MDM", "--method", "chain", "--estimator", "count"], "--method chain is exact"),
    (["--mdm", "MDM", "--method", "chain", "--n-samples", "8"], "--n-samples 8 is the ELBO's; --method chain"),
    (["--mdm", "MDM", "--context", "60", "--choice", "8", "--n", "1", "--distractors", "1"],
     "--context \\+ --choice = 68 tokens do not fit --mdm's context of 64"),
    (["--mdm", "MDM", "--distractors", "1000"], "--data .*the items need at least 1001"),
    (["--mdm", "MDM", "--n", "0"], "--n: .*0"),
])
def test_errors_name_the_option(ckpts, prepared, args, words):
    names = {"AR": str(ckpts["ar"]), "MDM": str(ckpts["mdm"]), "OTHER": str(ckpts["other"])}
    p = _bench(*[names.get(a, a) for a in args], "--data", str(prepared))
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    assert re.search(words, p.stderr), p.stderr

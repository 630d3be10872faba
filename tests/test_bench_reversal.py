# python -m pytest tests/test_bench_reversal.py -q
"""`smdm bench reversal` (smdm.benchmarks.reversal): the synthetic facts and their tokenizer, the batched
likelihood scorers against `smdm.evaluate` (the ARM's exact NLL by `score`, the MDM's chain rule over any
positions by `score_positions`), and the quick mode end to end through the CLI: JSON with every probe, and both
models learned the forward direction (accuracy well above chance). The reverse-direction result is the
experiment's output, reported, never asserted here."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from smdm.benchmarks import reversal
from smdm.evaluate import score, score_positions
from smdm.model import build_model, config_by_name

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


def test_facts_are_deterministic_unique_and_tokenize_one_id_per_word(tmp_path):
    from tokenizers import Tokenizer

    a = reversal.make_facts(60, 3, both_frac=0.25)
    b = reversal.make_facts(60, 3, both_frac=0.25)
    assert (a.names, a.descs, a.both.tolist()) == (b.names, b.descs, b.both.tolist())
    assert a.names != reversal.make_facts(60, 4).names
    assert len(set(a.names)) == 60 and len(set(a.descs)) == 60 and a.both.sum() == 15
    name_words = {w for n in a.names for w in n}
    desc_words = {w for d in a.descs for w in d}
    assert not name_words & desc_words and reversal.TEMPLATE not in name_words | desc_words
    tok = Tokenizer.from_file(str(reversal.write_tokenizer(a, tmp_path / "tokenizer.json")))
    text = " ".join((*a.names[0], reversal.TEMPLATE, *a.descs[0]))
    ids = tok.encode(text).ids
    assert len(ids) == 6 and tok.token_to_id("<unk>") not in ids
    assert tok.token_to_id(reversal.EOS) == 0
    n = reversal.write_training_file(a, tmp_path / "facts.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "facts.jsonl").read_text().splitlines()]
    assert n == len(lines) == 75 and all(x["prompt"] == "" for x in lines)
    reversed_lines = {x["response"] for x in lines} - {" ".join((*nm, "is", *d)) for nm, d in zip(a.names, a.descs)}
    assert reversed_lines == {" ".join((*d, "is", *nm)) for nm, d, both in zip(a.names, a.descs, a.both) if both}


def _rows(seed: int, n: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(1, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def test_batched_scorers_equal_evaluate_score():
    """The bench's rank scorers: the MDM's order-averaged chain rule is `score_positions(method="chain")`
    averaged over every order, for the NAME placed before its context (the infill probe), in the middle, and
    as a suffix (where `score` applies too; the bench runs without batch-invariant padding, so within float
    tolerance); the ARM's exact NLL is `score(method="ar")`."""
    vocab = 40
    mdm = build_model(config_by_name("tiny", vocab_size=vocab, max_seq_len=16), seed=1).eval()
    arm = build_model(config_by_name("tiny", vocab_size=vocab, causal=True, max_seq_len=16), seed=1).eval()
    rows = _rows(0, 6, 7, vocab)
    rows[3] = rows[2]  # duplicate rows share their forward passes: still the same numbers
    for positions in ([0, 1], [2, 4, 5], [4, 5, 6]):
        got = reversal.mdm_target_nll(mdm, rows, positions)
        items = [(r.tolist(), positions) for r in rows]
        orders = [list(o) for o in itertools.permutations(range(len(positions)))]
        want = np.mean([score_positions(mdm, items, method="chain", order=[o] * len(items)).nll
                        for o in orders], axis=0)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert np.ptp(got) > 1e-3  # the rows do differ
    pairs = [(r[:4].tolist(), r[4:].tolist()) for r in rows]  # the suffix: score's pairs give the same
    want = np.mean([score(mdm, pairs, method="chain", order=[list(o)] * len(pairs)).nll
                    for o in itertools.permutations(range(3))], axis=0)
    np.testing.assert_allclose(reversal.mdm_target_nll(mdm, rows, [4, 5, 6]), want, rtol=1e-5, atol=1e-5)
    # ARM: exact NLL of the last 2 tokens given the first 4
    got = reversal.arm_target_nll(arm, rows[:, :6], 4)
    want = score(arm, [(r[:4].tolist(), r[4:6].tolist()) for r in rows], method="ar").nll
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_ranks_are_pessimistic_on_ties():
    nll = np.array([[1.0, 2.0, 0.5], [3.0, 3.0, 3.0], [1.0, 1.0, 0.0]])
    assert reversal.ranks(nll).tolist() == [2, 3, 1]


def test_quick_mode_end_to_end(tmp_path):
    """`smdm bench reversal --quick` through the CLI: both models trained by the bundled trainer, every probe
    in the JSON, and the forward direction learned by both (the pipeline works; the reverse is only reported)."""
    from smdm.cli import main

    out = tmp_path / "r.json"
    assert main(["bench", "reversal", "--quick", "--threads", "1", "--json", str(out),
                 "--out", str(tmp_path / "runs")]) == 0
    (record,) = json.loads(out.read_text())
    assert record["bench"] == "reversal" and record["settings"]["quick"] is True
    (run,) = record["runs"]
    probes = run["probes"]
    assert set(probes) == {"forward", "reverse", "reverse infill", "reverse rank", "reverse infill rank"}
    for name, row in probes.items():
        assert row["n"] == record["settings"]["facts"]
        assert set(row) >= {"mdm", "chance"} and ("arm" in row) == ("infill" not in name)
    chance = probes["forward"]["chance"]["accuracy"]
    for model in ("mdm", "arm"):
        assert probes["forward"][model]["accuracy"] >= max(0.3, 5 * chance), (model, probes["forward"])
    for kind in ("mdm", "arm"):  # the trainer's checkpoints, where `smdm generate` can read them
        assert (tmp_path / "runs" / "seed-0" / kind / "metrics.jsonl").is_file()

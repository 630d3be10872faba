# python -m pytest tests/test_bench_scaling.py -q
"""`smdm bench scaling` (smdm.benchmarks.scaling): the IsoFLOP fits on data with a known answer, spelled-out
model sizes, and a small sweep end to end through the CLI (both objectives trained by the bundled trainer under
a FLOP budget, scored on the same validation windows), resumed from its cached runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from smdm.benchmarks import scaling
from smdm.model import config_by_name, parse_size

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


def test_isoflop_minimum_finds_the_vertex_or_falls_back_to_the_best_size():
    n = np.array([1e4, 3e4, 1e5, 3e5, 1e6])
    loss = 0.3 * (np.log(n) - np.log(6e4)) ** 2 + 4.0  # optimum N* = 6e4, L* = 4
    m = scaling.isoflop_minimum(n, loss)
    assert m["fit"] == "parabola" and not m["edge"]
    assert m["n_opt"] == pytest.approx(6e4, rel=1e-9) and m["loss"] == pytest.approx(4.0, abs=1e-9)
    falling = 5.0 - 0.1 * np.log(n)  # still improving at the largest size: the optimum is beyond the sizes
    m = scaling.isoflop_minimum(n, falling)
    assert m["edge"] and m["n_opt"] == pytest.approx(1e6) and m["loss"] == pytest.approx(falling[-1])
    m = scaling.isoflop_minimum(n[:2], loss[:2])  # two sizes: no parabola
    assert m["fit"] == "best tried" and m["n_opt"] == pytest.approx(3e4)


def test_power_law_and_compute_gap_recover_known_laws():
    C = np.array([1e17, 1e18, 1e19])
    law = scaling.power_law(C, 30.0 * C ** -0.05)
    assert law["A"] == pytest.approx(30.0, rel=1e-9) and law["alpha"] == pytest.approx(0.05, rel=1e-9)
    assert scaling.power_law(C[:1], [3.0]) is None
    # the MDM's law is the ARM's shifted by a factor 16 in compute: it needs 16x the compute for the same loss
    results = []
    for obj, a in (("ar", 30.0), ("mdm", 30.0 * 16 ** 0.05)):
        for c in C:
            for n, extra in ((1e8, 0.02), (3e8, 0.0), (9e8, 0.02)):  # the middle size (in ln N) is the optimum
                results.append({"objective": obj, "flops": float(c), "non_embedding_params": n,
                                "val_nll": a * c ** -0.05 + extra})
    results.append({"objective": "mdm", "flops": 1e17, "size": "x", "skipped": "budget below one step"})
    fits = scaling.fit(results)
    for obj in ("ar", "mdm"):
        assert [m["n_opt"] for m in fits["minima"][obj]] == pytest.approx([3e8] * 3, rel=1e-6)
        assert fits["laws"][obj]["alpha"] == pytest.approx(0.05, rel=1e-6)
    assert [g["ratio"] for g in fits["gap"]] == pytest.approx([16.0] * 3, rel=1e-5)


def test_training_flops_count_the_head_at_its_rows_and_the_attention():
    """--flops spends 6 N per token (N non-embedding, the paper's C = 6 N D); the real work adds the output head
    at the rows it runs on (ARM: every row, MDM: the masked ones, half under the linear schedule) and the
    attention over the window: 6 d V rows + 12 n_layer L d per token."""
    cfg = config_by_name("L2-H2-D48-F192", vocab_size=8192)
    run = {"size": "L2-H2-D48-F192", "objective": "ar", "seq_len": 128, "train_tokens": 1000}
    f = scaling.training_flops(run, 8192)
    assert f["nominal"] == 6 * cfg.non_embedding_params() * 1000
    assert f["head"] == 6 * 48 * 8192 * 1000 and f["attention"] == 12 * 2 * 128 * 48 * 1000
    assert f["total"] == f["nominal"] + f["head"] + f["attention"]
    m = scaling.training_flops({**run, "objective": "mdm", "schedule": None}, 8192)
    assert scaling.masked_fraction() == pytest.approx(0.5 * (1 - 1e-3) + 1e-3, abs=1e-9)
    assert m["head"] == pytest.approx(f["head"] * scaling.masked_fraction())
    assert scaling.masked_fraction("cosine") == pytest.approx(1 - 2 / np.pi, abs=1e-3)  # alpha = cos(pi t / 2)


def test_pareto_front_keeps_each_cheapest_improvement():
    pts = [(3.0, 5.0), (1.0, 7.0), (2.0, 7.5), (4.0, 5.0), (5.0, 4.0)]
    assert scaling.pareto_front(pts) == [(1.0, 7.0), (3.0, 5.0), (5.0, 4.0)]


def test_spelled_out_sizes():
    c = config_by_name("L3-H4-D96-F200", vocab_size=50)
    assert (c.n_layer, c.n_head, c.d_model, c.d_ff, c.max_seq_len) == (3, 4, 96, 200, 512)
    assert parse_size("l2-h2-d64") == (2, 2, 64, 256)  # ffn 4 x width
    assert parse_size("demo") == (4, 4, 128, 512) and parse_size("1.1B") == parse_size("1028M")  # names too
    for bad, msg in (("L2-H3-D64", "multiple of the 3 heads"), ("L2-H2-D6", "even head dimension"),
                     ("L0-H1-D8", "sizes must be >= 1"), ("L2-H2", "spelled out as")):
        with pytest.raises(ValueError, match=msg):
            config_by_name(bad)


def test_sweep_end_to_end_and_resumed_from_its_cache(prepared, tmp_path, capsys):
    from smdm.cli import main

    out, js = tmp_path / "sweep", tmp_path / "scaling.json"
    common = ["bench", "scaling", "--data", str(prepared), "--flops", "3e7", "1e8", "--batch-size", "4",
              "--seq-len", "32", "--val-samples", "4", "--threads", "1", "--out", str(out)]
    argv = common + ["--sizes", "L1-H2-D16-F32", "L1-H2-D32-F64", "L2-H2-D32-F64", "--val-windows", "4",
                     "--json", str(js)]
    assert main(argv) == 0
    first = capsys.readouterr().out
    rec = json.loads(js.read_text())[0]
    runs = rec["runs"]
    assert len(runs) == 3 * 2 * 2 and all("val_nll" in r for r in runs)
    for r in runs:  # the budget decided the steps: C / (6 N tokens per step)
        assert r["steps"] == int(r["flops"] // (6 * r["non_embedding_params"] * 4 * 32))
        assert np.isfinite(r["val_nll"]) and r["val_nll"] > 0
        assert (r["val_stderr"] > 0) == (r["objective"] == "mdm")  # the ARM's score is exact
    assert set(rec["fits"]["minima"]) == {"mdm", "ar"} and len(rec["fits"]["gap"]) == 2
    assert "IsoFLOP minima" in first and "compute gap" in first
    # on total FLOPs too: the vocabulary is the data's, each objective has a front, the gap is per ARM front point
    total = rec["fits"]["total"]
    assert total["vocab_size"] == 300 and set(total["fronts"]) == {"mdm", "ar"}
    assert len(total["gap"]) == len(total["fronts"]["ar"]) and "On total training FLOPs" in first
    # --refit: the same fits from the JSON alone, no training
    assert main(["bench", "scaling", "--refit", str(js), "--json", str(tmp_path / "re.json")]) == 0
    assert "cached" not in capsys.readouterr().out
    assert json.loads((tmp_path / "re.json").read_text())[0]["fits"] == rec["fits"]
    # the same command again: every run comes from its result.json, the fits are the same
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert again.count("cached") == 12
    assert json.loads(js.read_text())[0]["fits"] == rec["fits"]
    # a changed setting (the validation windows) reruns instead of reusing a result measured differently
    assert main(common + ["--sizes", "L1-H2-D16-F32", "--objectives", "ar", "--val-windows", "3"]) == 0
    text = capsys.readouterr().out
    assert "cached" not in text and "mdm" not in text.split("IsoFLOP minima")[1]  # one objective, one fit
    # --estimator count rescores the MDM runs (recorded); the default then does not take those results
    one = ["--sizes", "L1-H2-D16-F32", "--objectives", "mdm", "--val-windows", "4"]
    assert main(common + one + ["--estimator", "count"]) == 0
    assert "cached" not in capsys.readouterr().out
    res = json.loads((out / "runs" / "mdm-L1-H2-D16-F32-C3e+07" / "result.json").read_text())
    before = next(r for r in runs if (r["objective"], r["size"], r["flops"]) == ("mdm", "L1-H2-D16-F32", 3e7))
    assert res["val_estimator"] == "count" and res["steps"] == before["steps"]
    assert res["val_nll"] != before["val_nll"] and abs(res["val_nll"] - before["val_nll"]) < 0.5  # same ELBO
    assert main(common + one) == 0
    assert "cached" not in capsys.readouterr().out
    assert "val_estimator" not in json.loads((out / "runs" / "mdm-L1-H2-D16-F32-C3e+07" / "result.json").read_text())


def test_a_finished_run_trained_again_for_changed_settings_says_which(prepared, tmp_path, capsys):
    """A second call with a changed setting retrained the finished runs ("starting over ...: deleting 1 old
    checkpoint(s)") without saying why: a note per run names the settings that differ, old → new."""
    from smdm.cli import main

    out = tmp_path / "sweep"
    argv = ["bench", "scaling", "--data", str(prepared), "--flops", "3e7", "--sizes", "L1-H2-D16-F32",
            "--objectives", "ar", "--batch-size", "4", "--seq-len", "32", "--val-windows", "1", "--threads", "1",
            "--out", str(out)]
    assert main(argv) == 0
    assert "note:" not in capsys.readouterr().err
    assert main(argv + ["--val-windows", "2", "--lr", "0.001"]) == 0
    cap = capsys.readouterr()
    result = out / "runs" / "ar-L1-H2-D16-F32-C3e+07" / "result.json"
    assert cap.err.count("note:") == 1, cap.err
    assert (f"note: ar L1-H2-D16-F32 C=3e+07: {result} was measured with other settings (lr default → 0.001, "
            f"val_windows 1 → 2): training it again") in cap.err
    assert "cached" not in cap.out and json.loads(result.read_text())["val_windows"] == 2  # retrained, as before
    assert main(argv + ["--val-windows", "2", "--lr", "0.001"]) == 0  # the same settings: reused, no note
    cap = capsys.readouterr()
    assert "cached" in cap.out and "note:" not in cap.err


def test_a_missing_dataset_or_an_unknown_size_is_an_error_not_a_cached_skip(prepared, tmp_path):
    """A trainer error is recorded (and reused) as a skipped run, meant for a budget below one step: a missing
    --data or a misspelt size must stop the sweep before any run, or a later call with the data in place
    would keep reporting the cached "no such directory"."""
    from smdm.cli import main

    out = tmp_path / "sweep"
    common = ["bench", "scaling", "--quick", "--flops", "3e7", "--threads", "1", "--out", str(out)]
    with pytest.raises(SystemExit, match="--data .*nodata: no such directory"):
        main(common + ["--data", str(tmp_path / "nodata"), "--sizes", "L1-H2-D16-F32"])
    with pytest.raises(SystemExit, match="--sizes nosuch: unknown model config"):
        main(common + ["--data", str(prepared), "--sizes", "L1-H2-D16-F32", "nosuch"])
    # any other trainer error (here: no CUDA) stops the sweep; it was cached as "skipped" and the sweep exited 0
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match=r"mdm L1-H2-D16-F32 C=3e\+07: --device cuda"):
            main(common + ["--data", str(prepared), "--sizes", "L1-H2-D16-F32", "--device", "cuda"])
    with pytest.raises(SystemExit, match="the validation split has .* tokens, fewer than one window"):
        main(common + ["--data", str(prepared), "--sizes", "L1-H2-D16-F32", "--seq-len", "100000"])
    assert not list(out.rglob("result.json"))

# python -m pytest -q tests/test_bench_cli.py
"""`smdm bench` command lines: a bad count, size or --json directory is argparse's error naming the option,
when the command line is read (before: `--tokens -5` ran, and a --json in a missing directory was a traceback
after the benchmark had run); small real runs write their JSON records and leave nothing behind; bad input
files are errors naming the option, not tracebacks."""

from __future__ import annotations

import json
import tempfile

import pytest
from smdm.cli import main


@pytest.mark.parametrize("argv,msg", [
    (["pack", "--tokens", "0"], "argument --tokens: must be >= 1, got 0"),
    (["pack", "--tokens", "-5"], "argument --tokens: must be >= 1, got -5"),
    (["pack", "--repeats", "x"], "argument --repeats: not an integer: 'x'"),
    (["pack", "--mean-doc", "0"], "argument --mean-doc: must be >= 1, got 0"),  # was a ZeroDivisionError
    (["pack", "--repeats", "0"], "argument --repeats: must be >= 1, got 0"),  # printed 0 Mtok/s and nan ratios
    (["pack", "--vocab-size", "1"], "argument --vocab-size: needs 2 <= ids < 2**32"),  # was numpy's "low >= high"
    (["pack", "--json", "{missing}/x.json"], "argument --json: {missing}/x.json: no directory {missing}"),
    (["mask", "--batch", "8", "0"], "argument --batch: must be >= 1, got 0"),
    (["mask", "--min-time", "0"], "argument --min-time: must be > 0, got 0"),
    (["mask", "--min-time", "nan"], "argument --min-time: must be > 0, got nan"),
    (["tokenize", "--mb", "-1"], "argument --mb: must be > 0, got -1"),
    (["tokenize", "--json", "{missing}/x.json"], "argument --json: {missing}/x.json: no directory"),
    (["sampler", "--gen-lengths", "0"], "argument --gen-lengths: must be >= 1, got 0"),
    (["sampler", "--json", "{missing}/x.json"], "argument --json: {missing}/x.json: no directory"),
    (["frontier", "--mdm", "M", "--json", "{missing}/x.json"], "argument --json: {missing}/x.json"),
    (["reversal", "--quick", "--json", "{missing}/x.json"], "argument --json: {missing}/x.json"),
    (["reversal", "--quick", "--both-frac", "2"], "argument --both-frac: must be a fraction in [0, 1], got 2"),
    (["reversal", "--quick", "--facts", "0"], "argument --facts: must be >= 1, got 0"),
    (["sampler", "--dtype", "float64x"], "argument --dtype: invalid choice: 'float64x'"),
    (["scaling", "--quick", "--json", "{missing}/x.json"], "argument --json: {missing}/x.json"),
])
def test_bad_options_are_usage_errors_naming_the_option(argv, msg, capsys, tmp_path):
    missing = str(tmp_path / "missing")  # a directory that does not exist
    argv, msg = [a.format(missing=missing) for a in argv], msg.format(missing=missing)
    with pytest.raises(SystemExit) as e:
        main(["bench", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err, err


def test_small_pack_and_mask_runs_write_their_records(tmp_path, capsys):
    out = tmp_path / "pack.json"
    assert main(["bench", "pack", "--tokens", "20000", "--mean-doc", "64", "--repeats", "1", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert {r["variant"] for r in records} >= {"rust", "numpy copy (same bytes)"}
    # past 65536 ids the stream is uint32, the copy baseline too (it drew uint16 ids: "high is out of bounds")
    assert main(["bench", "pack", "--tokens", "2000", "--vocab-size", "100000", "--repeats", "1",
                 "--json", str(out)]) == 0
    assert {r["vocab_size"] for r in json.loads(out.read_text())} == {100000}
    out = tmp_path / "mask.json"
    assert main(["bench", "mask", "--batch", "2", "--seq-len", "64", "--min-time", "0.01", "--json", str(out)]) == 0
    assert len(json.loads(out.read_text())) >= 2


def test_bench_tokenize_removes_the_tokenizer_it_trained(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where tempfile puts its files
    assert main(["bench", "tokenize", "--mb", "0.01", "--vocab-size", "300", "--repeats", "1"]) == 0
    assert "rust:" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_bench_tokenize_a_missing_or_bad_tokenizer_is_an_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"x" 1}')
    for path, msg in ((tmp_path / "none.json", "none.json: No such file"), (bad, "bad.json: tokenizer error")):
        with pytest.raises(SystemExit, match=f"smdm bench tokenize: error: --tokenizer .*{msg}"):
            main(["bench", "tokenize", "--mb", "0.01", "--tokenizer", str(path), "--repeats", "1"])


def test_bench_sampler_quality_mode_checks_its_inputs_before_generating(tmp_path, prepared):
    """--quality-ckpt without --quality-data, a missing checkpoint and an ARM were a TypeError, a CheckpointError
    and (after generating with every cache) a ValueError from elbo_nll: errors naming the option now."""
    from smdm import checkpoint
    from smdm.model import build_model, config_by_name

    model = build_model(config_by_name("tiny", vocab_size=300, causal=True, max_seq_len=64), seed=0)
    arm = checkpoint.save(tmp_path / "ar", 1, model_state=model.state_dict(),
                          config={"model": model.config.to_dict(), "objective": "ar"}, train_state={"step": 1},
                          tokenizer_path=prepared / "tokenizer.json")
    base = ["bench", "sampler", "--gen-lengths", "8", "--quality-n", "2", "--prompt-length", "4"]
    for extra, msg in ((["--quality-ckpt", str(arm)], "--quality-ckpt needs --quality-data"),
                       (["--quality-ckpt", str(tmp_path / "none"), "--quality-data", str(prepared)],
                        "--quality-ckpt .*none: checkpoint path .* does not exist"),
                       (["--quality-ckpt", str(arm), "--quality-data", str(prepared)],
                        "--quality-ckpt .* is an autoregressive checkpoint")):
        with pytest.raises(SystemExit, match=f"smdm bench sampler: error: {msg}"):
            main(base + extra)


def test_bench_sampler_quality_mode_scores_with_the_chosen_estimator(tmp_path, prepared, capsys):
    """--estimator / --quality-samples reach the quality mode's ELBOs and are recorded; the count estimator's
    scores differ from the time estimator's on the same outputs (other masks and weights)."""
    import json

    from smdm import checkpoint
    from smdm.model import build_model, config_by_name

    model = build_model(config_by_name("tiny", vocab_size=300, max_seq_len=64), seed=0)
    mdm = checkpoint.save(tmp_path / "mdm", 1, model_state=model.state_dict(),
                          config={"model": model.config.to_dict(), "objective": "mdm"}, train_state={"step": 1},
                          tokenizer_path=prepared / "tokenizer.json")
    base = ["bench", "sampler", "--gen-lengths", "8", "--quality-n", "2", "--prompt-length", "4",
            "--quality-block", "4", "--quality-ckpt", str(mdm), "--quality-data", str(prepared)]
    runs = {}
    for est in ("time", "count"):
        out = tmp_path / f"{est}.json"
        assert main(base + ["--estimator", est, "--quality-samples", "3", "--json", str(out)]) == 0
        assert f"3 samples, {est} estimator" in capsys.readouterr().out
        runs[est] = json.loads(out.read_text())
        assert {(r["elbo_estimator"], r["elbo_samples"]) for r in runs[est]} == {(est, 3)}
    assert [r["outputs"] for r in runs["time"][:3]] == [r["outputs"] for r in runs["count"][:3]]
    assert runs["time"][0]["elbo_nats_per_token"] != runs["count"][0]["elbo_nats_per_token"]


def test_bench_sampler_quality_mode_names_bad_settings_before_generating(tmp_path, prepared, capsys):
    """A block that does not divide the generation length, a negative temperature and a generation past the
    context were tracebacks (one a ZeroDivisionError) after loading; fewer documents than --quality-n is a
    note, fewer than 2 an error (no paired standard error)."""
    from smdm import checkpoint
    from smdm.model import build_model, config_by_name

    model = build_model(config_by_name("tiny", vocab_size=300, max_seq_len=256), seed=0)
    mdm = checkpoint.save(tmp_path / "mdm", 1, model_state=model.state_dict(),
                          config={"model": model.config.to_dict(), "objective": "mdm"}, train_state={"step": 1},
                          tokenizer_path=prepared / "tokenizer.json")
    base = ["bench", "sampler", "--quality-ckpt", str(mdm), "--quality-data", str(prepared), "--prompt-length", "4"]
    for extra, msg in ((["--gen-lengths", "16", "--quality-block", "5"], "--quality-block 5 must divide"),
                       (["--gen-lengths", "16", "--quality-block", "32"], "--quality-block 32 must divide"),
                       (["--gen-lengths", "8", "--quality-block", "4", "--quality-temperature", "-1"],
                        "--quality-temperature must be finite and >= 0"),
                       (["--gen-lengths", "256", "--quality-block", "8"], "4 \\+ generation length 256 > the "
                        "model's context of 256"),
                       (["--gen-lengths", "8", "--quality-block", "4", "--prompt-length", "168"],
                        "has 1 validation document")):  # the test data: 11 val documents, one of 176+ tokens
        with pytest.raises(SystemExit, match=f"smdm bench sampler: error: .*{msg}"):
            main(base + extra)
    assert main(base + ["--gen-lengths", "8", "--quality-block", "4", "--quality-n", "1000",
                        "--quality-samples", "2"]) == 0
    assert "validation documents of 12+ tokens: " in capsys.readouterr().err


def test_bench_sampler_quality_samples_needs_two(capsys):
    """One sample has no standard error: elbo_nll refused it after every cache variant had generated."""
    with pytest.raises(SystemExit) as e:
        main(["bench", "sampler", "--quality-ckpt", "C", "--quality-data", "D", "--quality-samples", "1"])
    assert e.value.code == 2 and "--quality-samples: must be >= 2" in capsys.readouterr().err


def test_bench_sampler_quality_options_without_the_quality_mode_are_an_error(capsys):
    assert main(["bench", "sampler", "--estimator", "count", "--quality-samples", "8"]) == 2
    assert ("smdm bench sampler: error: --estimator, --quality-samples applies to the quality mode "
            "(--quality-ckpt) only") in capsys.readouterr().err


def test_bench_sampler_threads_applies_to_the_quality_mode(monkeypatch):
    import torch
    from smdm.benchmarks import sampler

    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    monkeypatch.setattr(sampler, "quality_main", lambda args: 0)
    assert main(["bench", "sampler", "--quality-ckpt", "CKPT", "--quality-data", "DATA", "--threads", "1"]) == 0
    assert threads == [1]


@pytest.mark.parametrize("argv,msg", [
    (["sampler", "--config", "nosuch"], "smdm bench sampler: error: --config: unknown model config 'nosuch'"),
    (["sampler", "--device", "foo"], "smdm bench sampler: error: --device: "),
])
def test_sampler_config_and_device_are_checked_before_a_model_is_built(argv, msg, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv,msg", [
    (["--config", "nosuch"], "smdm bench reversal: error: unknown model config 'nosuch'"),
    (["--facts", "1000", "--name-pool", "3", "--name-len", "1"], "1000 facts need more distinct names"),
])
def test_reversal_settings_are_checked_before_any_training(argv, msg, tmp_path):
    with pytest.raises(SystemExit, match=msg):
        main(["bench", "reversal", "--quick", "--out", str(tmp_path / "r"), *argv])
    assert not (tmp_path / "r").exists()  # nothing trained, nothing written


def test_cli_interrupts_unwritable_outputs_and_bare_groups_end_in_one_line(monkeypatch, capsys):
    """Ctrl-C printed a traceback (exit 1); an output that could not be written (`--out /proc/x`, a bench's
    --json) a traceback after the work; `smdm data` / `smdm bench` alone printed help and exited 0."""
    from smdm import data_cli
    from smdm.cli import main

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(data_cli, "_run_prepare", interrupted)
    assert main(["prepare", "--out", "x"]) == 130
    assert capsys.readouterr().err.strip() == "smdm prepare: interrupted"

    def unwritable(args):
        raise PermissionError(13, "Permission denied", "/sys/x.json")

    monkeypatch.setattr(data_cli, "_run_prepare", unwritable)
    assert main(["prepare", "--out", "x"]) == 1
    assert capsys.readouterr().err.strip() == "smdm prepare: error: /sys/x.json: Permission denied"
    for group in ("data", "bench"):
        assert main([group]) == 2
        cap = capsys.readouterr()
        assert cap.out == "" and f"usage: smdm {group}" in cap.err

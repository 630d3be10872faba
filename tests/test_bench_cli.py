# python -m pytest tests/test_bench_cli.py -q
"""`smdm bench pack|mask|tokenize|sampler` through the CLI at tiny sizes: what they leave behind and how they
answer bad input (an error naming the option, not a traceback)."""

from __future__ import annotations

import tempfile

import pytest
from smdm.cli import main


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
    base = ["bench", "sampler", "--gen-lengths", "8", "--quality-n", "1", "--prompt-length", "4"]
    for extra, msg in ((["--quality-ckpt", str(arm)], "--quality-ckpt needs --quality-data"),
                       (["--quality-ckpt", str(tmp_path / "none"), "--quality-data", str(prepared)],
                        "--quality-ckpt .*none: checkpoint path .* does not exist"),
                       (["--quality-ckpt", str(arm), "--quality-data", str(prepared)],
                        "--quality-ckpt .* is an autoregressive checkpoint")):
        with pytest.raises(SystemExit, match=f"smdm bench sampler: error: {msg}"):
            main(base + extra)


def test_bench_sampler_threads_applies_to_the_quality_mode(monkeypatch):
    import torch
    from smdm.benchmarks import sampler

    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    monkeypatch.setattr(sampler, "quality_main", lambda args: 0)
    assert main(["bench", "sampler", "--quality-ckpt", "CKPT", "--quality-data", "DATA", "--threads", "1"]) == 0
    assert threads == [1]


def test_bench_pack_sizes_must_be_positive():
    for flag in ("--tokens", "--mean-doc", "--repeats"):
        with pytest.raises(SystemExit, match=f"smdm bench pack: error: {flag} must be >= 1, got 0"):
            main(["bench", "pack", "--tokens", "1000", "--repeats", "1", flag, "0"])

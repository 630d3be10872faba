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

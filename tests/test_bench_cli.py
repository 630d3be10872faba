# python -m pytest -q tests/test_bench_cli.py
"""`smdm bench` command lines: a bad count, size or --json directory is argparse's
error naming the option, when the command line is read (before: `--tokens -5` ran, and a --json in a missing
directory was a traceback after the benchmark had run); a small real run writes its JSON records."""

from __future__ import annotations

import json

import pytest
from smdm.cli import main


@pytest.mark.parametrize("argv,msg", [
    (["pack", "--tokens", "0"], "argument --tokens: must be >= 1, got 0"),
    (["pack", "--tokens", "-5"], "argument --tokens: must be >= 1, got -5"),
    (["pack", "--repeats", "x"], "argument --repeats: not an integer: 'x'"),
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
    out = tmp_path / "mask.json"
    assert main(["bench", "mask", "--batch", "2", "--seq-len", "64", "--min-time", "0.01", "--json", str(out)]) == 0
    assert len(json.loads(out.read_text())) >= 2

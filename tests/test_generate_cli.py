# pytest tests/test_generate_cli.py
"""`smdm generate` / `smdm infill`: option validation, the hole syntax, and runs on a saved checkpoint."""

import json
import os
from pathlib import Path

import pytest
from smdm import checkpoint, cli
from smdm.generate_cli import encode_with_holes, parse_ids, render
from smdm.model import build_model, config_by_name

WORDS = ["<|endoftext|>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "fast", "[UNK]"]


def _tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return Tokenizer.from_file(str(path))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    _tokenizer(root / "tokenizer.json")
    out = {}
    for kind, causal in (("mdm", False), ("ar", True)):
        model = build_model(config_by_name("tiny", vocab_size=len(WORDS), causal=causal, max_seq_len=64))
        out[kind] = checkpoint.save(root / kind, 1, model_state=model.state_dict(),
                                    config={"model": model.config.to_dict(), "objective": kind},
                                    train_state={"step": 1}, tokenizer_path=root / "tokenizer.json")
    return out


def run(capsys, *argv):
    rc = cli.main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("argv,msg", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--gen-length", "10", "--block-length", "3"], "does not divide"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.2"], "--top-p must be in (0, 1]"),
    (["--sampler", "threshold"], "--threshold is required"),
    (["--sampler", "beam"], "--sampler must be one of"),
    (["--gen-length", "8", "--block-length", "4", "--steps", "3"], "multiple of the number of blocks"),
    (["--cache", "all"], "--cache must be one of"),
    (["--num-samples", "0"], "--num-samples must be >= 1"),
])
def test_bad_options_fail_before_loading(capsys, argv, msg):
    rc, _, err = run(capsys, "generate", "--ckpt", "/nonexistent", "--prompt", "x", *argv)
    assert rc == 2 and msg in err


def test_prompt_longer_than_context(capsys, ckpts):
    rc, _, err = run(capsys, "generate", "--ckpt", str(ckpts["mdm"]), "--prompt", "the cat " * 30,
                     "--gen-length", "8")
    assert rc == 2 and "context" in err


def test_generate_text_and_json(capsys, ckpts):
    rc, out, err = run(capsys, "generate", "--ckpt", str(ckpts["mdm"]), "--prompt", "the cat", "--prompt",
                       "a dog ran", "--gen-length", "8", "--steps", "4", "--json", "--no-eos")
    assert rc == 0, err
    res = json.loads(out)
    assert [len(t) for t in res["tokens"]] == [8, 8] and res["forward_passes"] == 4
    rc, out2, err = run(capsys, "generate", "--ckpt", str(ckpts["mdm"]), "--prompt", "the cat",
                        "--gen-length", "8", "--steps", "8", "--block-length", "4", "--show-steps",
                        "--device", "cpu")
    assert rc == 0 and "step 8" in err and out2.strip()


def test_generate_ids_and_arm(capsys, ckpts):
    rc, out, _ = run(capsys, "generate", "--ckpt", str(ckpts["ar"]), "--prompt-ids", "1 2", "--gen-length",
                     "6", "--cache", "prefix", "--json", "--no-eos", "--temperature", "1", "--top-k", "3")
    res = json.loads(out)
    assert rc == 0 and len(res["tokens"][0]) == 6 and res["forward_passes"] == 6


def test_arm_names_the_mdm_only_options_it_does_not_use(capsys, ckpts):
    """The ARM twin decodes left to right: --steps / --sampler / --block-length given for it were silently unused.
    A note names them (the tokens are the ones without them); with no such option there is no note."""
    base = ["generate", "--ckpt", str(ckpts["ar"]), "--prompt-ids", "1 2", "--gen-length", "4", "--json"]
    rc, plain, err = run(capsys, *base)
    assert rc == 0 and "note" not in err, err
    rc, out, err = run(capsys, *base, "--steps", "2", "--sampler", "ancestral", "--block-length", "2")
    assert rc == 0, err
    assert "--steps 2, --sampler ancestral, --block-length 2 apply to the MDM only" in err, err
    assert json.loads(out)["tokens"] == json.loads(plain)["tokens"]
    rc, _, err = run(capsys, "generate", "--ckpt", str(ckpts["mdm"]), "--prompt-ids", "1 2", "--gen-length", "4",
                     "--steps", "2", "--sampler", "ancestral", "--json")
    assert rc == 0 and "note" not in err, err


def test_generate_dual_cache_is_the_library_call(capsys, ckpts):
    """--cache dual: the tokens of smdm.generate(cache="dual"); the ARM twin refuses it by name."""
    import smdm

    rc, out, err = run(capsys, "generate", "--ckpt", str(ckpts["mdm"]), "--prompt-ids", "1 2 3", "--gen-length",
                       "8", "--steps", "4", "--block-length", "4", "--cache", "dual", "--json", "--no-eos")
    assert rc == 0, err
    model, _ = smdm.load(ckpts["mdm"], device="cpu")
    want = smdm.generate(model, [[1, 2, 3]], gen_length=8, steps=4, block_length=4, cache="dual")
    assert json.loads(out)["tokens"] == want.tokens
    rc, _, err = run(capsys, "generate", "--ckpt", str(ckpts["ar"]), "--prompt-ids", "1", "--gen-length", "4",
                     "--cache", "dual")
    assert rc != 0 and "MDM only" in err


def test_cache_refresh_is_the_library_call(capsys, ckpts):
    """--cache-refresh N: the tokens of smdm.generate(cache_refresh=N); it needs a block cache; an ARM notes it
    as unused (its KV cache is exact)."""
    import smdm

    argv = ["--prompt-ids", "1 2 3", "--gen-length", "8", "--steps", "8", "--block-length", "4", "--cache", "dual",
            "--temperature", "1", "--json", "--no-eos"]
    rc, out, err = run(capsys, "generate", "--ckpt", str(ckpts["mdm"]), *argv, "--cache-refresh", "2")
    assert rc == 0, err
    model, _ = smdm.load(ckpts["mdm"], device="cpu")
    want = smdm.generate(model, [[1, 2, 3]], gen_length=8, steps=8, block_length=4, cache="dual", cache_refresh=2,
                         temperature=1.0)
    assert json.loads(out)["tokens"] == want.tokens
    rc, _, err = run(capsys, "generate", "--ckpt", str(ckpts["mdm"]), "--prompt-ids", "1", "--cache-refresh", "2")
    assert rc == 2 and "--cache-refresh needs --cache prefix or --cache dual" in err
    for extra in ((), ("--cache", "prefix")):
        rc, _, err = run(capsys, "generate", "--ckpt", str(ckpts["ar"]), "--prompt-ids", "1", "--gen-length", "4",
                         "--cache-refresh", "2", *extra)
        assert rc == 0 and "--cache-refresh 2 apply to the MDM only" in err, err


def test_num_samples_draw_each_input_with_seeds_seed_plus_j(capsys, ckpts):
    """--num-samples N: N rows per input with seeds seed..seed+N-1, so one prompt's samples differ at
    temperature 1 (one seed for all rows would give same-length prompts identical noise), and sample j equals
    a plain run with --seed seed+j."""
    common = ["--gen-length", "16", "--steps", "16", "--temperature", "1", "--no-eos", "--json"]
    rc, out, err = run(capsys, "generate", "--ckpt", str(ckpts["mdm"]), "--prompt", "the cat", "--prompt",
                       "a dog", "--num-samples", "3", "--seed", "5", *common)
    assert rc == 0, err
    toks = json.loads(out)["tokens"]
    assert len(toks) == 6 and len({tuple(t) for t in toks[:3]}) == 3
    for j in range(3):
        _, one, _ = run(capsys, "generate", "--ckpt", str(ckpts["mdm"]), "--prompt", "a dog", "--seed",
                        str(5 + j), *common)
        assert json.loads(one)["tokens"][0] == toks[3 + j]
    rc, out, _ = run(capsys, "infill", "--ckpt", str(ckpts["mdm"]), "--text", "the <|mask:6|> mat",
                     "--num-samples", "2", "--temperature", "1", "--no-eos")
    assert rc == 0 and "--- 0 sample 1 (seed 1)" in out


def test_infill_hole_syntax(capsys, ckpts, tmp_path):
    tok = _tokenizer(tmp_path / "t.json")
    ids = encode_with_holes(tok, "the cat <|mask:3|> the <|mask|> mat", 99)
    assert ids == [1, 2, 99, 99, 99, 1, 99, 5]
    with pytest.raises(ValueError, match="no hole"):
        encode_with_holes(tok, "the cat", 99)
    assert parse_ids("1, 2 _ 3", mask_id=99) == [1, 2, 99, 3]
    assert render([1, 99, 2], tok, 99) == "the·cat"
    rc, out, err = run(capsys, "infill", "--ckpt", str(ckpts["mdm"]), "--text", "the cat <|mask:3|> mat",
                       "--json")
    assert rc == 0, err
    filled = json.loads(out)["tokens"][0]
    assert filled[:2] == [1, 2] and filled[-1] == 5 and len(filled) == 6 and max(filled) < len(WORDS)
    rc, _, err = run(capsys, "infill", "--ckpt", str(ckpts["ar"]), "--ids", "1 _ 2")
    assert rc == 2 and "autoregressive" in err
    big = str(2**80)  # said like generate --prompt-ids says it (it was "Overflow when unpacking long long")
    rc, _, err = run(capsys, "infill", "--ckpt", str(ckpts["mdm"]), "--ids", f"1 2 _ _ {big}")
    assert rc == 2 and f"holds token id {big} outside" in err
    rc, out, err = run(capsys, "infill", "--ckpt", str(ckpts["mdm"]), "--ids", "1 2 _ _ 3", "--top-k", big, "--json")
    assert rc == 0, err


# ---- --schedule, and the checkpoint's training schedule as the default ----


@pytest.fixture(scope="module")
def sched_ckpts(tmp_path_factory):
    """MDM checkpoints whose config.json names a training schedule (train.schedule), one of them bad."""
    root = tmp_path_factory.mktemp("sched")
    _tokenizer(root / "tokenizer.json")
    model = build_model(config_by_name("tiny", vocab_size=len(WORDS), causal=False, max_seq_len=64))
    out = {}
    for name, schedule in (("cosine", "cosine"), ("bad", "cosinus")):
        out[name] = checkpoint.save(root / name, 1, model_state=model.state_dict(),
                                    config={"model": model.config.to_dict(), "objective": "mdm",
                                            "train": {"schedule": schedule}},
                                    train_state={"step": 1}, tokenizer_path=root / "tokenizer.json")
    return out


def _masks_per_step(err):
    """Masked positions after each step, from the --show-steps lines ('step k | text with ·')."""
    return [line.count("·") for line in err.splitlines() if line.startswith("step ")]


def _expected(schedule, G=8, S=4):
    from smdm.diffusion import parse_schedule
    from smdm.sampling import commit_count

    left, m = [], G
    for i in range(S):
        m -= commit_count(m, parse_schedule(schedule), i, S)
        left.append(m)
    return left


def test_schedule_precedence(capsys, ckpts, sched_ckpts, one_thread):
    """--schedule, else the checkpoint's train.schedule, else linear; the steps follow the chosen one."""
    assert _expected("cosine") != _expected("linear")
    args = ["--prompt", "the cat", "--gen-length", "8", "--steps", "4", "--json", "--no-eos", "--show-steps"]
    for ckpt, extra, want in ((ckpts["mdm"], [], "linear"), (sched_ckpts["cosine"], [], "cosine"),
                              (sched_ckpts["cosine"], ["--schedule", "linear"], "linear"),
                              (ckpts["mdm"], ["--schedule", "cosine"], "cosine"),
                              (sched_ckpts["bad"], ["--schedule", "polynomial:2"], "polynomial:2.0")):
        rc, out, err = run(capsys, "generate", "--ckpt", str(ckpt), *args, *extra)
        assert rc == 0, err
        assert json.loads(out)["schedule"] == want
        assert _masks_per_step(err) == _expected(want), (ckpt, extra)
    rc, out, err = run(capsys, "infill", "--ckpt", str(sched_ckpts["cosine"]), "--text",
                       "the <|mask:8|> mat", "--steps", "4", "--json", "--show-steps")
    assert rc == 0 and json.loads(out)["schedule"] == "cosine" and _masks_per_step(err) == _expected("cosine")


def test_bad_schedule(capsys, sched_ckpts):
    rc, _, err = run(capsys, "generate", "--ckpt", "/nonexistent", "--prompt", "x", "--schedule", "cosinus")
    assert rc == 2 and "--schedule: unknown schedule 'cosinus'" in err  # before loading anything
    rc, _, err = run(capsys, "infill", "--ckpt", "/nonexistent", "--ids", "1 _", "--schedule", "polynomial:-1")
    assert rc == 2 and "unknown schedule 'polynomial:-1'" in err
    rc, _, err = run(capsys, "generate", "--ckpt", str(sched_ckpts["bad"]), "--prompt", "the")
    assert rc == 2 and "train.schedule" in err and "'cosinus'" in err and "--schedule" in err


def test_missing_checkpoint_is_an_error_not_a_traceback(capsys, tmp_path):
    for name, src in (("generate", ["--prompt", "x"]), ("infill", ["--ids", "1 _"])):
        rc, _, err = run(capsys, name, "--ckpt", str(tmp_path / "nope"), *src)
        assert rc == 2 and "does not exist" in err and "Traceback" not in err
    (tmp_path / "step-3").mkdir()  # an interrupted save: no manifest
    rc, _, err = run(capsys, "generate", "--ckpt", str(tmp_path / "step-3"), "--prompt", "x")
    assert rc == 2 and "incomplete" in err


def test_bad_device_is_an_error_not_a_traceback(capsys, ckpts, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, _, err = run(capsys, "generate", "--ckpt", str(ckpts["mdm"]), "--prompt", "the", "--device", "cuda")
    assert rc == 2 and "device 'cuda': CUDA is not available" in err and "Traceback" not in err
    rc, _, err = run(capsys, "infill", "--ckpt", str(ckpts["mdm"]), "--ids", "1 _", "--device", "gpu")
    assert rc == 2 and "device 'gpu'" in err
    with pytest.raises(ValueError, match="device 'cuda:0': CUDA is not available"):
        checkpoint.load(ckpts["ar"], device="cuda:0")
    assert next(checkpoint.load(ckpts["ar"], device="auto")[0].parameters()).device.type == "cpu"


def test_malformed_or_oversized_holes_and_ids_without_holes(capsys, ckpts, tmp_path):
    tok = _tokenizer(tmp_path / "t.json")
    for text in ("the <|mask: 3|> mat", "the <|mask:3> mat <|mask|>", "the <|mask:|> cat <|mask|>",
                 "<|MASK:2|> the <|mask|>"):
        with pytest.raises(ValueError, match="malformed hole"):
            encode_with_holes(tok, text, 99)
    with pytest.raises(ValueError, match="context of 64"):
        encode_with_holes(tok, "the <|mask:99999999999999|>", 99, max_len=64)  # never builds the list
    assert encode_with_holes(tok, "the <|mask:63|>", 99, max_len=64) == [1] + [99] * 63
    with pytest.raises(ValueError, match=r"the hole '<\|mask:64\|>' makes the text longer than the model's context"):
        encode_with_holes(tok, "the <|mask:64|>", 99, max_len=64)  # one past the context: the hole's own error
    rc, _, err = run(capsys, "infill", "--ckpt", str(ckpts["mdm"]), "--text", "the <|mask: 2|> mat <|mask|>")
    assert rc == 2 and "malformed hole" in err
    rc, _, err = run(capsys, "infill", "--ckpt", str(ckpts["mdm"]), "--text", "the <|mask:1000000000000|>")
    assert rc == 2 and "context" in err
    rc, out, err = run(capsys, "infill", "--ckpt", str(ckpts["mdm"]), "--ids", "1 2 _", "--ids", "1 2 3")
    assert rc == 2 and "no masked position" in err and not out


def test_threshold_sampler_with_blocks_takes_any_step_count(capsys, ckpts):
    """--sampler threshold is adaptive: --steps need not be a multiple of the number of blocks (the other
    samplers split their steps evenly over the blocks and refuse such a count)."""
    base = ["generate", "--ckpt", str(ckpts["mdm"]), "--prompt-ids", "1 2", "--gen-length", "8", "--block-length",
            "4", "--steps", "3", "--json", "--no-eos"]
    rc, out, err = run(capsys, *base, "--sampler", "threshold", "--threshold", "0.9")
    assert rc == 0 and len(json.loads(out)["tokens"][0]) == 8, err
    assert "note: --steps 3 is unused by --sampler threshold" in err  # it was silently ignored
    rc, _, err = run(capsys, *base)
    assert rc == 2 and "multiple of the number of blocks" in err
    rc, out, err = run(capsys, *base[:5], "--gen-length", "4", "--steps", "9", "--json")
    assert rc == 0 and "note: --steps 9 > --gen-length 4" in err and json.loads(out)["forward_passes"] <= 4, err
    rc, out, err = run(capsys, *base[:5], "--gen-length", "4", "--steps", "9", "--sampler", "ancestral")
    assert rc == 0 and "note" not in err, err  # its steps are a finer grid of reveal times: they matter


# ---- a file of inputs: --input FILE --output OUT (smdm.generate_file) ----


def _write_jsonl(path, objs, blank_after=None):
    with open(path, "w", encoding="utf-8") as f:
        for i, o in enumerate(objs):
            f.write(json.dumps(o) + "\n")
            if i == blank_after:
                f.write("\n")
    return str(path)


def _records(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


PROMPTS = [{"id": "a", "prompt": "the cat sat"}, {"id": "b", "prompt": [1, 7, 8, 9, 2]}, {"id": "c", "prompt": "a"},
           {"id": "d", "prompt": "the dog ran on the mat"}, {"id": "e", "prompt": "the cat sat"}]
SAMPLE = ["--gen-length", "8", "--steps", "8", "--temperature", "1", "--no-eos"]


def test_input_file_rows_equal_one_generate_call_each(capsys, ckpts, tmp_path):
    """Every record is the tokens of smdm.generate on its prompt alone with seed + sample, in input order with
    the input object and its line kept; --batch-size (rows are batched shortest first) changes nothing."""
    import smdm

    inp = _write_jsonl(tmp_path / "p.jsonl", PROMPTS, blank_after=1)
    outs = {}
    for bs in ("1", "3"):
        out = tmp_path / f"out{bs}.jsonl"
        rc, _, err = run(capsys, "generate", "--ckpt", str(ckpts["mdm"]), "--input", inp, "--output", str(out),
                         "--num-samples", "2", "--seed", "3", "--batch-size", bs, *SAMPLE)
        assert rc == 0, err
        assert f"wrote 10 rows to {out}" in err and not (tmp_path / f"out{bs}.jsonl.part").exists()
        outs[bs] = out.read_bytes()
    assert outs["1"] == outs["3"]
    recs = _records(tmp_path / "out3.jsonl")
    model, tok = smdm.load(ckpts["mdm"], device="cpu")
    assert [(r["index"], r["sample"], r["seed"], r["input"]["id"]) for r in recs] == [
        (i, j, 3 + j, o["id"]) for i, o in enumerate(PROMPTS) for j in range(2)]
    assert [r["line"] for r in recs[::2]] == [1, 2, 4, 5, 6]  # the blank line 3 is skipped
    for r in recs:
        p = r["input"]["prompt"]
        ids = tok.encode(p, add_special_tokens=False).ids if isinstance(p, str) else p
        want = smdm.generate(model, [ids], gen_length=8, steps=8, temperature=1.0, seed=r["seed"])
        assert r["tokens"] == want.tokens[0] and r["text"] == render(want.tokens[0], tok, model.config.mask_id)
    assert recs[0]["tokens"] != recs[1]["tokens"]  # two samples of one prompt differ at temperature 1
    assert recs[0]["tokens"] == recs[8]["tokens"]  # the same prompt and seed on another line: the same draw


def test_input_file_for_infill_and_the_arm(capsys, ckpts, tmp_path):
    import smdm

    inp = _write_jsonl(tmp_path / "h.jsonl", [{"text": "the <|mask:3|> mat"}, {"text": [1, None, None, 5]}])
    rc, _, err = run(capsys, "infill", "--ckpt", str(ckpts["mdm"]), "--input", inp, "--output",
                     str(tmp_path / "f.jsonl"), "--temperature", "1", "--no-eos")
    assert rc == 0, err
    model, _ = smdm.load(ckpts["mdm"], device="cpu")
    m = model.config.mask_id
    got = [r["tokens"] for r in _records(tmp_path / "f.jsonl")]
    assert got == [smdm.infill(model, [ids], temperature=1.0).tokens[0] for ids in ([1, m, m, m, 5], [1, m, m, 5])]
    rc, _, err = run(capsys, "generate", "--ckpt", str(ckpts["ar"]), "--input", _write_jsonl(
        tmp_path / "p.jsonl", PROMPTS), "--output", str(tmp_path / "ar.jsonl"), "--gen-length", "4", "--no-eos")
    assert rc == 0, err
    arm, tok = smdm.load(ckpts["ar"], device="cpu")
    first = _records(tmp_path / "ar.jsonl")[0]
    assert first["tokens"] == smdm.generate(arm, [tok.encode("the cat sat").ids], gen_length=4).tokens[0]


def test_interrupted_run_resumes_to_the_same_file(capsys, ckpts, tmp_path, monkeypatch):
    """Ctrl-C after two batches leaves them in OUT.part (exit 130, no OUT); --resume runs only the rest, drops
    a last line cut short by a crash, and writes the file an uninterrupted run writes."""
    from smdm import sampling

    inp = _write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    common = ["generate", "--ckpt", str(ckpts["mdm"]), "--input", inp, "--batch-size", "2", *SAMPLE]
    rc, _, err = run(capsys, *common, "--output", str(tmp_path / "whole.jsonl"))
    assert rc == 0, err
    real, calls = sampling.generate, []

    def interrupted(model, prompts, **kw):
        calls.append(len(prompts))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(model, prompts, **kw)

    monkeypatch.setattr(sampling, "generate", interrupted)
    out, part = tmp_path / "out.jsonl", tmp_path / "out.jsonl.part"
    rc, _, err = run(capsys, *common, "--output", str(out))
    assert rc == 130 and "4 of 5 rows are in" in err and "--resume" in err
    assert not out.exists() and len(part.read_text().splitlines()) == 1 + 4
    rc, _, err = run(capsys, *common, "--output", str(out))
    assert rc == 2 and "add --resume" in err
    with open(part, "a") as f:
        f.write('{"index": 4, "sam')  # a crash in the middle of a write
    calls.clear()
    rc, _, err = run(capsys, *common, "--output", str(out), "--resume")
    assert rc == 0, err
    assert calls == [1] and "resuming: 4 of 5 rows" in err and not part.exists()
    assert out.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    rc, _, err = run(capsys, *common, "--output", str(out))
    assert rc == 2 and "exists: add --overwrite" in err
    monkeypatch.undo()
    assert run(capsys, *common, "--output", str(out), "--overwrite")[0] == 0


def test_resume_refuses_a_part_of_other_settings_or_input(capsys, ckpts, tmp_path, monkeypatch):
    from smdm import sampling

    inp = _write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    out = str(tmp_path / "out.jsonl")
    common = ["generate", "--ckpt", str(ckpts["mdm"]), "--batch-size", "2", "--output", out, *SAMPLE]

    def stop(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(sampling, "generate", stop)
    assert run(capsys, *common, "--input", inp)[0] == 130
    monkeypatch.undo()
    rc, _, err = run(capsys, *common, "--input", inp, "--resume", "--seed", "7")
    assert rc == 2 and "other settings (seed: 0 there, 7 now)" in err
    _write_jsonl(tmp_path / "p.jsonl", PROMPTS[:3])
    rc, _, err = run(capsys, *common, "--input", inp, "--resume")
    assert rc == 2 and "input_sha256" in err
    _write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    rc, _, err = run(capsys, *common, "--input", inp, "--resume", "--steps", "8", "--cache", "none")
    assert rc == 0, err  # the defaults spelled out are the same settings
    # a file of the same name that is not ours (a browser's unfinished download) is never touched
    foreign = b"some downloaded bytes\nmore bytes without a newline"
    (tmp_path / "out.jsonl.part").write_bytes(foreign)
    for extra in ((), ("--resume",)):
        rc, _, err = run(capsys, *common, "--input", inp, "--overwrite", *extra)
        assert rc == 2 and "is not the part file of an `smdm generate --output` run" in err, err
        assert (tmp_path / "out.jsonl.part").read_bytes() == foreign


def test_resume_knows_the_checkpoint_by_its_weights_not_its_path(capsys, ckpts, tmp_path, monkeypatch):
    """The part file records the digest of the weights and tokenizer (from the checkpoint's manifest): a copy
    of the checkpoint at another path resumes, other weights moved to the same path are refused (the path
    alone let a run mix two models, and refused a byte-identical copy)."""
    import shutil

    from smdm import sampling
    from smdm.model import build_model, config_by_name

    inp = _write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    out = str(tmp_path / "out.jsonl")
    here = tmp_path / "run" / "step-1"
    shutil.copytree(ckpts["mdm"], here)

    def stop(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(sampling, "generate", stop)
    common = ["generate", "--input", inp, "--batch-size", "2", "--output", out, *SAMPLE]
    assert run(capsys, *common, "--ckpt", str(here))[0] == 130
    monkeypatch.undo()
    shutil.rmtree(here.parent)
    other = build_model(config_by_name("tiny", vocab_size=len(WORDS), max_seq_len=64), seed=9)
    checkpoint.save(here.parent, 1, model_state=other.state_dict(),
                    config={"model": other.config.to_dict(), "objective": "mdm"}, train_state={"step": 1},
                    tokenizer_path=ckpts["mdm"] / "tokenizer.json")
    rc, _, err = run(capsys, *common, "--ckpt", str(here), "--resume")
    assert rc == 2 and "other settings (model_sha256:" in err, err
    rc, _, err = run(capsys, *common, "--ckpt", str(ckpts["mdm"]), "--resume")  # the first model, elsewhere
    assert rc == 0, err
    # a part file of smdm before the digest (its header names the checkpoint's path) resumes at that path only
    monkeypatch.setattr(sampling, "generate", stop)
    Path(out).unlink()
    assert run(capsys, *common, "--ckpt", str(ckpts["mdm"]))[0] == 130
    monkeypatch.undo()
    part = Path(out + ".part")
    lines = part.read_text().splitlines(keepends=True)
    head = json.loads(lines[0])
    del head["settings"]["model_sha256"]
    head["settings"]["ckpt"] = str(Path(ckpts["mdm"]).resolve())
    part.write_text(json.dumps(head) + "\n" + "".join(lines[1:]))
    rc, _, err = run(capsys, *common, "--ckpt", str(here), "--resume")  # other weights: refused
    assert rc == 2 and "other settings" in err, err
    rc, _, err = run(capsys, *common, "--ckpt", str(ckpts["mdm"]), "--resume")
    assert rc == 0, err


def test_input_read_once_from_a_pipe_and_never_overwritten(capsys, ckpts, tmp_path, monkeypatch):
    """A FIFO (`--input <(...)`) is read once: its digest is of the bytes parsed, so a resume fed other lines is
    refused; --output naming the input (or its part file naming it) is refused before anything is written."""
    import threading

    from smdm import sampling

    fifo = tmp_path / "fifo"

    def feed(objs):
        os.mkfifo(fifo)
        t = threading.Thread(target=lambda: fifo.write_text("".join(json.dumps(o) + "\n" for o in objs)))
        t.start()
        return t

    out = str(tmp_path / "out.jsonl")
    common = ["generate", "--ckpt", str(ckpts["mdm"]), "--batch-size", "2", "--output", out, *SAMPLE]
    real = sampling.generate
    calls = []

    def once(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(sampling, "generate", once)
    t = feed(PROMPTS)
    assert run(capsys, *common, "--input", str(fifo))[0] == 130
    t.join()
    monkeypatch.undo()
    fifo.unlink()
    t = feed([{"prompt": "a dog"}] * 5)
    rc, _, err = run(capsys, *common, "--input", str(fifo), "--resume")
    t.join()
    assert rc == 2 and "input_sha256" in err, err
    inp = _write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    before = (tmp_path / "p.jsonl").read_bytes()
    rc, _, err = run(capsys, "generate", "--ckpt", str(ckpts["mdm"]), "--input", inp, "--output", inp,
                     "--overwrite", *SAMPLE)
    assert rc == 2 and "would overwrite the input" in err, err
    part_named = _write_jsonl(tmp_path / "q.jsonl.part", PROMPTS)
    rc, _, err = run(capsys, "generate", "--ckpt", str(ckpts["mdm"]), "--input", part_named, "--output",
                     str(tmp_path / "q.jsonl"), "--resume", *SAMPLE)
    assert rc == 2 and "would overwrite the input" in err, err
    assert (tmp_path / "p.jsonl").read_bytes() == before


@pytest.mark.parametrize("line,msg", [
    ({"text": "x"}, "p.jsonl:2: missing field 'prompt' (choose the field with --field)"),
    ({"prompt": 5}, "p.jsonl:2: field 'prompt' must be a string or a list of token ids, got int"),
    ({"prompt": [1, 99]}, "p.jsonl:2: field 'prompt' holds 99: token ids are ints in [0, 11)"),
    ({"prompt": [1, None]}, "p.jsonl:2: field 'prompt' holds None"),
    ({"prompt": "the " * 60}, "p.jsonl:2: field 'prompt' has 60 tokens: with --gen-length 8 that is 68 >"),
    ({"prompt": "the\ud800"}, "p.jsonl:2: a string holds '\\ud800', which is not Unicode text"),
    ({"prompt": [1], "note": "\udc80"}, "p.jsonl:2: a string holds '\\udc80'"),
])
def test_bad_input_lines_are_named(capsys, ckpts, tmp_path, line, msg):
    inp = _write_jsonl(tmp_path / "p.jsonl", [PROMPTS[0], line])
    rc, _, err = run(capsys, "generate", "--ckpt", str(ckpts["mdm"]), "--input", inp, "--output",
                     str(tmp_path / "o.jsonl"), *SAMPLE)
    assert rc == 2 and msg in err, err
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o.jsonl.part").exists()


def test_input_file_errors(capsys, ckpts, tmp_path):
    m = str(ckpts["mdm"])
    long_tail = _write_jsonl(tmp_path / "t.jsonl", [{"text": "the <|mask:2|> mat"},
                                                    {"text": "the <|mask:2|> " + "cat " * 70}])
    rc, _, err = run(capsys, "infill", "--ckpt", m, "--input", long_tail, "--output", str(tmp_path / "o"))
    assert rc == 2 and "t.jsonl:2: field 'text' has 73 tokens > the model's context of 64" in err, err
    empty = _write_jsonl(tmp_path / "e.jsonl", [{"prompt": "the"}, {"prompt": ""}])
    rc, _, err = run(capsys, "generate", "--ckpt", str(ckpts["ar"]), "--input", empty, "--output", str(tmp_path / "o"))
    assert rc == 2 and "e.jsonl:2: field 'prompt' is empty: the autoregressive model needs" in err, err
    inp = _write_jsonl(tmp_path / "h.jsonl", [{"text": [1, 2]}])
    rc, _, err = run(capsys, "infill", "--ckpt", m, "--input", inp, "--output", str(tmp_path / "o"))
    assert rc == 2 and "h.jsonl:1: field 'text' has no masked position: mark the positions to fill with null" in err
    (tmp_path / "bad.jsonl").write_text('{"prompt": "the"}\n{"prompt": \n')
    rc, _, err = run(capsys, "generate", "--ckpt", m, "--input", str(tmp_path / "bad.jsonl"), "--output",
                     str(tmp_path / "o"))
    assert rc == 2 and "bad.jsonl:2: not valid JSON" in err
    (tmp_path / "empty.jsonl").write_text("\n")
    rc, _, err = run(capsys, "generate", "--ckpt", m, "--input", str(tmp_path / "empty.jsonl"), "--output",
                     str(tmp_path / "o"))
    assert rc == 2 and "no JSON objects" in err
    for argv, msg in ((["--input", inp], "--input needs --output"),
                      (["--prompt", "x", "--output", str(tmp_path / "o")], "--output go with --input FILE"),
                      (["--prompt", "x", "--resume", "--batch-size", "4"], "--batch-size, --resume go with"),
                      (["--input", inp, "--output", str(tmp_path / "o"), "--json"], "--json does not go with --input")):
        rc, _, err = run(capsys, "generate", "--ckpt", m, *argv)
        assert rc == 2 and msg in err, (argv, err)
    with pytest.raises(SystemExit):  # argparse's error, before the checkpoint loads
        cli.main(["generate", "--ckpt", m, "--input", inp, "--output", str(tmp_path / "nodir" / "o")])
    assert "argument --output" in capsys.readouterr().err


def test_input_from_stdin(ckpts, tmp_path):
    """--input - reads the JSONL from standard input (a real process): the records of the same file, errors
    named by <stdin>:line."""
    import subprocess
    import sys

    inp = _write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    base = [sys.executable, "-m", "smdm.cli", "generate", "--ckpt", str(ckpts["mdm"]), *SAMPLE]
    file_run = subprocess.run(base + ["--input", inp, "--output", str(tmp_path / "a.jsonl")], capture_output=True,
                              text=True, timeout=300)
    assert file_run.returncode == 0, file_run.stderr
    with open(inp, "rb") as f:
        p = subprocess.run(base + ["--input", "-", "--output", str(tmp_path / "b.jsonl")], stdin=f,
                           capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    p = subprocess.run(base + ["--input", "-", "--output", str(tmp_path / "c.jsonl")], input='{"prompt": 5}\n',
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "<stdin>:1: field 'prompt' must be a string" in p.stderr, p.stderr


def test_threads_option_sets_torch_and_the_rust_pool(capsys, ckpts, monkeypatch):
    """generate, infill and eval take --threads like the benches (torch's threads and RAYON_NUM_THREADS, set
    before the Rust pool starts): on a busy 2-core machine one thread was 10-100x faster than torch's default."""
    import os

    import torch

    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    rc, out, err = run(capsys, "generate", "--ckpt", str(ckpts["mdm"]), "--prompt", "the cat", "--gen-length", "4",
                       "--threads", "1")
    assert rc == 0, err
    rc, _, err = run(capsys, "infill", "--ckpt", str(ckpts["mdm"]), "--text", "the <|mask|> sat", "--threads", "2")
    assert rc == 0, err
    assert run(capsys, "eval", "ppl", "--ckpt", "/nonexistent", "--data", "/nonexistent", "--threads", "3")[0] == 2
    assert threads == [1, 2, 3] and os.environ["RAYON_NUM_THREADS"] == "3"

# pytest tests/test_generate_cli.py
"""`smdm generate` / `smdm infill`: option validation, the hole syntax, and runs on a saved checkpoint."""

import json

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
    rc, _, err = run(capsys, *base)
    assert rc == 2 and "multiple of the number of blocks" in err

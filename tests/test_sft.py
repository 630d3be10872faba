# python -m pytest tests/test_sft.py -q
"""Supervised fine-tuning (`smdm train --sft`, smdm.sft): the JSONL reader and its errors, the token rows, the
reader's order and resume, what the MDM and the ARM are trained on (prompts clean and never in the loss, EOS
padding noised and learned by the MDM, ignored after the first EOS by the ARM), the losses against hand-computed
references, CFG prompt drop, resume, gradient accumulation, --init-from, a learning check on a synthetic
mapping task, and the checkpoint through `smdm eval gsm8k` and `smdm generate`."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from smdm import checkpoint as ckpt
from smdm import rng, sft
from smdm.config import TrainConfig
from smdm.train import Trainer, TrainError, train

LETTERS = "abcdefgh"
SEQ_LEN = 24


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


def reverse_pairs(n: int, seed: int) -> list[dict]:
    """The mapping task: prompt "x= a b c ;", response " c b a" (the letters reversed)."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        w = [r.choice(LETTERS) for _ in range(r.randint(2, 5))]
        out.append({"prompt": "x= " + " ".join(w) + " ;", "response": " " + " ".join(reversed(w))})
    return out


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A byte-level BPE trained here on the task's text (EOS <|endoftext|> = 0), train/val files, and a GSM8K-format
    file."""
    from smdm._core import Tokenizer

    root = tmp_path_factory.mktemp("sft")
    train_rows, val_rows = reverse_pairs(400, 0), reverse_pairs(48, 1)
    texts = [r["prompt"] + r["response"] for r in train_rows] + ["Question: what is 2 plus 3?\nAnswer: 5"] * 20
    (root / "tokenizer.json").write_text(Tokenizer.train_bpe(texts, 300).to_json())
    gsm = [{"question": f"What is {a} plus {b}?", "answer": f"{a}+{b}=<<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"}
           for a, b in [(1, 2), (2, 3), (4, 4), (3, 5), (6, 1), (2, 2), (5, 3), (7, 1)]]
    return {"root": root, "tok": root / "tokenizer.json",
            "train": write_jsonl(root / "train.jsonl", train_rows), "val": write_jsonl(root / "val.jsonl", val_rows),
            "gsm8k": write_jsonl(root / "gsm8k.jsonl", gsm)}


@pytest.fixture(scope="module")
def tokenizer(files):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(files["tok"]))


@pytest.fixture(scope="module")
def mask_id(tokenizer):
    return tokenizer.get_vocab_size(True)  # the MDM's mask id is its vocabulary size


def sft_cfg(files, out, **kw) -> TrainConfig:
    base = dict(config="tiny", sft=str(files["train"]), tokenizer=str(files["tok"]), out=str(out), max_steps=4,
                batch_size=8, seq_len=SEQ_LEN, val_every=0, val_samples=4, save_every=0, samples=0, lr=3e-3)
    base.update(kw)
    return TrainConfig(**base)


def metrics(out) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def step_losses(out) -> list[float]:
    return [r["loss"] for r in metrics(out) if "loss" in r]


def vals(out) -> list[dict]:
    return [r for r in metrics(out) if r.get("event") == "val"]


def load(files, tokenizer, path=None, seq_len=SEQ_LEN, **kw):
    return sft.load_examples(path or files["train"], tokenizer, seq_len=seq_len, eos_id=0,
                             vocab_size=tokenizer.get_vocab_size(True), **kw)


# ---------------------------------------------------------------------------------------------------------
# reading files


@pytest.mark.parametrize("lines, match", [
    (['{"prompt": "a", "response": "b"}', '{"prompt": "a"}'], r":2: missing field 'response' \(the response"),
    (['{"prompt": "a", "response": "b"}', "", '{"prompt": 3, "response": "b"}'],
     r":3: field 'prompt' must be a string, got 3"),
    (['{"prompt": "a", "response": "b"', '{}'], r":1: not valid JSON"),
    (['["a", "b"]'], r":1: expected a JSON object, got list"),
    (["", "   "], r": no examples \(empty file\)"),
])
def test_bad_jsonl_names_file_line_and_field(tmp_path, lines, match):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(sft.SftDataError, match=re.escape(str(path)) + match):
        list(sft.read_pairs(path))


@pytest.mark.parametrize("bad_line", [2, 14, 45])
def test_a_bad_utf8_byte_is_named_at_its_line(tmp_path, bad_line):
    """Text-mode readline decodes 8 KB at a time: a bad byte on line 45 was reported at line 42, on line 2 at 1."""
    good = json.dumps({"prompt": "What is two plus two? " * 8, "response": "four " * 40}).encode()
    lines = [good] * 60
    lines[bad_line - 1] = good.replace(b"two plus", b"two\xe9plus", 1)
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(sft.SftDataError, match=re.escape(f"{path}:{bad_line}: not UTF-8 text")):
        list(sft.read_pairs(path))


def test_bad_files_through_the_trainer(files, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"q": "a", "response": "b"}'])
    with pytest.raises(TrainError, match=r"bad\.jsonl:1: missing field 'prompt'"):
        Trainer(sft_cfg(files, tmp_path / "r", sft=str(bad)))
    with pytest.raises(TrainError, match=r"bad\.jsonl:1: missing field 'prompt'"):
        Trainer(sft_cfg(files, tmp_path / "r", sft_val=str(bad)))
    with pytest.raises(TrainError, match=r"train\.jsonl:1: missing field 'q2' \(the prompt; fields here: 'prompt', "
                                         r"'response'\)"):
        Trainer(sft_cfg(files, tmp_path / "r", prompt_field="q2"))
    with pytest.raises(TrainError, match="nope.jsonl: no such file"):
        Trainer(sft_cfg(files, tmp_path / "r", sft=str(tmp_path / "nope.jsonl")))


def test_gsm8k_format_is_the_zero_shot_eval_prompt(files, tokenizer):
    from smdm.evaluate import gsm8k_prompt, read_gsm8k

    items = read_gsm8k(files["gsm8k"])
    pairs = list(sft.read_pairs(files["gsm8k"], "gsm8k"))
    assert [no for no, _, _ in pairs] == [it.line for it in items]
    for (_, prompt, response), it in zip(pairs, items):
        assert prompt == gsm8k_prompt(it.question) and prompt.endswith("\nAnswer:")
        assert response == " " + it.answer.split("=<<")[0] + "=" + it.answer.split(">>")[1]
        assert "<<" not in response and response.endswith(f"#### {it.gold}")
    ex = load(files, tokenizer, files["gsm8k"], seq_len=64, fmt="gsm8k")
    for i, it in enumerate(items):  # the prompt ids are exactly what `smdm eval gsm8k` feeds the model
        want = tokenizer.encode(gsm8k_prompt(it.question), add_special_tokens=False).ids
        assert ex.tokens[ex.offsets[i]:ex.offsets[i] + ex.prompt_lens[i]].tolist() == want


def test_rows_are_prompt_response_eos_padded_with_eos(files, tokenizer, tmp_path):
    rows = [{"prompt": "x= a b ;", "response": " b a"}, {"prompt": "x= a b c d e ;", "response": " e d c b a"},
            {"prompt": "", "response": " a b"}]
    ex = load(files, tokenizer, write_jsonl(tmp_path / "t.jsonl", rows), seq_len=12)
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
    assert len(ex) == 2 and ex.read == 3 and ex.dropped == 1 and ex.lines.tolist() == [1, 3]
    assert ex.longest == (len(enc(rows[1]["prompt"])) + len(enc(rows[1]["response"])) + 1, 2)
    assert "1 longer dropped" in ex.summary() and f"the longest has {ex.longest[0]} tokens, line 2" in ex.summary()
    b = ex.rows([0, 1, 0])
    for j, i in enumerate([0, 2, 0]):
        p, r = enc(rows[i]["prompt"]), enc(rows[i]["response"])
        want = p + r + [0] * (12 - len(p) - len(r))  # EOS (id 0) ends the answer and pads the row
        assert b["input_ids"][j].tolist() == want
        assert int(b["prompt_lens"][j]) == len(p) and int(b["lengths"][j]) == len(p) + len(r) + 1
    assert b["input_ids"].dtype == torch.int64 and b["index"].tolist() == [0, 1, 0]
    exact = load(files, tokenizer, tmp_path / "t.jsonl", seq_len=ex.longest[0])  # the longest fits exactly
    assert len(exact) == 3 and exact.dropped == 0
    with pytest.raises(sft.SftDataError, match=rf"none of its 3 examples fits --seq-len 2 .*longest has "
                                               rf"{ex.longest[0]} tokens, line 2"):
        load(files, tokenizer, tmp_path / "t.jsonl", seq_len=2)
    # a tokenizer whose ids exceed the model's vocabulary
    with pytest.raises(sft.SftDataError, match=r"t\.jsonl:1: field 'prompt' encodes to token id \d+ >= the "
                                               r"model's vocabulary size 40"):
        sft.load_examples(tmp_path / "t.jsonl", tokenizer, seq_len=12, eos_id=0, vocab_size=40)


def test_responses_are_the_rest_of_the_joint_encoding(files, tokenizer, tmp_path):
    """A response's ids are encode(prompt + response) after encode(prompt): under a Llama-2-style normalizer
    (a "▁" prepended to every text) encoding the response alone added a spurious "▁" piece (a doubled space
    in the decoded text). Where a token spans the boundary the response is encoded alone, and counted."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    llama = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    llama.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    llama.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                       decoders.Strip(" ", 1, 0)])
    # trained with pieces that start at a "▁" (as SentencePiece's never span one), encoding with no
    # pre-tokenizer, as Llama-2's tokenizer.json does
    llama.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    llama.train_from_iterator(["Question: what is 2 plus 3?\nAnswer: 5 and the answer is 42"] * 50,
                              trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    llama.pre_tokenizer = None
    assert llama.encode(" 5", add_special_tokens=False).tokens == ["▁", "▁5"]  # the spurious piece alone
    rows = [{"prompt": "Question: what is 2 plus 3?\nAnswer:", "response": " 5"}, {"prompt": "", "response": "42"}]
    path = write_jsonl(tmp_path / "llama.jsonl", rows)
    ex = sft.load_examples(path, llama, seq_len=64, eos_id=2, vocab_size=llama.get_vocab_size(True))
    for i, row in enumerate(rows):
        ids = ex.tokens[ex.offsets[i]:ex.offsets[i + 1]].tolist()
        assert ids == llama.encode(row["prompt"] + row["response"], add_special_tokens=False).ids + [2]
        assert ex.prompt_lens[i] == len(llama.encode(row["prompt"], add_special_tokens=False).ids)
        assert llama.decode(ids[:-1]) == row["prompt"] + row["response"]  # no doubled space
    assert ex.split == 0 and "encoded apart" not in ex.summary()
    # byte-level BPE: a prompt ending in a space merges with the response's first piece ("Ġ" + "5" -> "Ġ5")
    enc = lambda t: tokenizer.encode(t, add_special_tokens=False).ids  # noqa: E731
    rows = [{"prompt": "x= a b ; ", "response": "b a"}, {"prompt": "x= a b ;", "response": " b a"}]
    assert enc("x= a b ; b a")[:len(enc("x= a b ; "))] != enc("x= a b ; ")  # the case this covers
    ex = load(files, tokenizer, write_jsonl(tmp_path / "space.jsonl", rows))
    assert ex.tokens[ex.offsets[0]:ex.offsets[1]].tolist() == enc("x= a b ; ") + enc("b a") + [0]
    assert ex.tokens[ex.offsets[1]:ex.offsets[2]].tolist() == enc("x= a b ; b a") + [0]
    assert ex.split == 1 and "1 responses encoded apart from their prompts" in ex.summary()


def test_special_token_text_in_sft_data_is_text(files, tmp_path):
    """The trainer encodes SFT texts as `smdm prepare` encodes documents: `<|endoftext|>` written in a response
    is text, not the EOS the model learns to end answers with (it put EOS in mid-answer)."""
    from smdm.train import Trainer

    rows = [{"prompt": "x= a <|endoftext|> b ;", "response": " b <|endoftext|> a"}] * 8
    t = Trainer(sft_cfg(files, tmp_path / "run", sft=str(write_jsonl(tmp_path / "eos.jsonl", rows)), seq_len=64))
    try:
        ex = t.train_examples
        ids = ex.tokens[ex.offsets[0]:ex.offsets[1]].tolist()
        assert ids.count(0) == 1 and ids[-1] == 0, ids  # the appended EOS alone
    finally:
        t.dist.close()


def test_reader_order_ranks_epochs_and_resume(files, tokenizer):
    ex = load(files, tokenizer)
    n = len(ex)
    assert n == 400
    # 2 ranks x 3 rows x 2 accumulation batches: a step is 12 examples, an epoch 34 steps (408 = 400 + 8 wrapped)
    ranks = [sft.SftDataset(ex, 3, seed=5, rank=r, world_size=2, step_batches=2) for r in range(2)]
    assert len(ranks[0]) == 68 and ranks[0].steps_per_epoch == 34
    order = {e: np.concatenate([d.example_ids(e, b) for d in ranks for b in range(68)]) for e in (0, 1)}
    for e in (0, 1):
        assert sorted(set(order[e].tolist())) == list(range(n))  # every example in every epoch ...
        assert np.array_equal(order[e][n:], order[e][:8])  # ... the padding wraps to the epoch's start
    assert not np.array_equal(order[0], order[1])  # a new order each epoch, a pure function of (seed, epoch)
    again = sft.SftDataset(ex, 3, seed=5, rank=1, world_size=2, step_batches=2)
    assert np.array_equal(again.example_ids(1, 7), ranks[1].example_ids(1, 7))
    # iteration rolls over epochs; state_dict resumes in O(1) at the same batch
    it = iter(ranks[0])
    first = [next(it)["index"].tolist() for _ in range(70)]
    assert first[68] == ranks[0].example_ids(1, 0).tolist()
    state = ranks[0].state_dict()
    assert state == {"epoch": 1, "batch": 2}
    fresh = sft.SftDataset(ex, 3, seed=5, rank=0, world_size=2, step_batches=2)
    fresh.load_state_dict(state)
    assert next(iter(fresh))["index"].tolist() == next(it)["index"].tolist()


# ---------------------------------------------------------------------------------------------------------
# what the models are trained on


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_workers_serve_each_batch_once(files, tokenizer, workers):
    """Under DataLoader workers every batch of a pass is served once, as in this process (each worker
    replayed the whole pass, so every example came twice with two workers); a pass may start at any epoch."""
    ex = load(files, tokenizer)
    for e in range(2):
        ds = sft.SftDataset(ex, 16, seed=3, epochs=e + 1)
        ds.load_state_dict({"epoch": e, "batch": 0})
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
        got = [(b["epoch"], b["batch"], b["index"].tolist()) for b in loader]
        assert got == [(e, b, ds.example_ids(e, b).tolist()) for b in range(len(ds))]
        served = [i for _, _, idx in got for i in idx]
        assert len(served) == len(ds) * 16 and set(served) == set(range(len(ex)))  # the wrapped tail: 1 or 2 x


def test_mdm_prompts_stay_clean_and_padding_is_noised(files, tmp_path, monkeypatch, loss_inputs, mask_id):
    from smdm import diffusion

    # a seed whose step 0 would crop the batch under pretraining's random-length rule (probability 0.01)
    seed = next(s for s in range(10_000) if diffusion.crop_length(s, 0, SEQ_LEN, 0.01) < SEQ_LEN)
    seen = loss_inputs
    train(sft_cfg(files, tmp_path / "r", max_steps=6, seed=seed))
    assert [k for k, _ in seen] == ["sft"] * 6
    masked_pad = 0
    for _, kw in seen:
        L = kw["x0"].shape[1]
        assert L == SEQ_LEN  # no random-length crop in SFT
        pos = torch.arange(L)[None]
        prompt = pos < kw["prompt_lens"][:, None]
        assert not kw["mask"][prompt].any() and (kw["weight"][prompt] == 0).all()
        assert torch.equal(kw["noisy"][prompt], kw["x0"][prompt])  # p_uncond 0: prompts always given
        assert torch.equal(kw["noisy"][~kw["mask"]], kw["x0"][~kw["mask"]])
        assert (kw["noisy"][kw["mask"]] == mask_id).all()
        after_eos = (kw["x0"] == 0) & ~prompt & (torch.cumsum((kw["x0"] == 0).long(), 1) > 1)  # padding EOS
        masked_pad += int((kw["mask"] & after_eos).sum())
        assert (kw["weight"][kw["mask"] & after_eos] > 0).all()  # ... and in the loss
    assert masked_pad > 20


def test_mdm_loss_equals_a_hand_computed_reference(files, tmp_path, mask_id):
    t = Trainer(sft_cfg(files, tmp_path / "r", max_steps=1, batch_size=6))
    batch = t.dataset.examples.rows(t.dataset.example_ids(0, 0))
    x0, pl = batch["input_ids"], batch["prompt_lens"]
    with torch.no_grad():
        from smdm import diffusion

        fp = diffusion.forward_process(x0, seed=0, step=0, mask_id=mask_id, prompt_lens=pl, crop_prob=0.0)
        logp = torch.log_softmax(t.model(fp.noisy_ids).double(), -1)  # (B, L, V): the full head, unlike the loss
        ref = 0.0
        for b in range(6):
            L = x0.shape[1]
            s = sum(-logp[b, j, x0[b, j]] / fp.p[b] for j in range(L) if fp.mask[b, j])
            ref += float(s) / (L - int(pl[b]))  # divided by the non-prompt tokens (answer + EOS padding)
        ref /= 6
    t.fit()
    t.dist.close()
    assert step_losses(t.out)[0] == pytest.approx(ref, rel=1e-5)


def test_ar_loss_equals_a_hand_computed_reference_and_ignores_late_padding(files, tmp_path, monkeypatch, loss_inputs):
    seen = loss_inputs
    t = Trainer(sft_cfg(files, tmp_path / "r", objective="ar", max_steps=1, batch_size=6))
    batch = t.dataset.examples.rows(t.dataset.example_ids(0, 0))
    ids, pl, ln = batch["input_ids"], batch["prompt_lens"], batch["lengths"]
    with torch.no_grad():
        logp = torch.log_softmax(t.model(ids[:, :-1]).double(), -1)  # (B, L-1, V)
        ref = 0.0
        for b in range(6):
            targets = range(int(pl[b]), int(ln[b]))  # the response tokens and the first EOS
            ref += float(sum(-logp[b, i - 1, ids[b, i]] for i in targets)) / len(targets)
        ref /= 6
        # changing the padding after the first EOS or the prompt's last target-free tokens changes nothing
        junk = ids.clone()
        late = torch.arange(SEQ_LEN)[None] >= ln[:, None]
        junk[late] = 5
        assert sft.ar_sft_loss(t.model, junk, pl, ln) == sft.ar_sft_loss(t.model, ids, pl, ln)
        assert sft.ar_sft_loss(t.model, ids, pl, ln - 1) != sft.ar_sft_loss(t.model, ids, pl, ln)  # EOS counts
    t.fit()
    t.dist.close()
    assert [k for k, _ in seen] == ["ar_sft"]
    assert step_losses(t.out)[0] == pytest.approx(ref, rel=1e-5)


def test_cfg_prompt_drop_rate_and_inputs_only(files, tmp_path, monkeypatch, loss_inputs, mask_id):
    from smdm import diffusion

    seen = loss_inputs
    p_uncond, B, steps = 0.3, 16, 12
    train(sft_cfg(files, tmp_path / "r", max_steps=steps, batch_size=B, p_uncond=p_uncond, seed=3))
    drops = 0
    for step, (_, kw) in enumerate(seen):
        x0, pl = kw["x0"], kw["prompt_lens"]
        prompt = torch.arange(SEQ_LEN)[None] < pl[:, None]
        # the drop of global sample s is uniform(key(seed, step, s, UNCOND, 0)) < p_uncond
        want = [rng.uniform(rng.key(3, step, s, rng.Stream.UNCOND, 0)) < p_uncond for s in range(B)]
        assert (pl > 0).all()  # every prompt of the task is non-empty
        got = [bool((kw["noisy"][b][prompt[b]] == mask_id).all()) for b in range(B)]
        assert got == want
        drops += sum(got)
        # only inputs change: the same mask, weights and answer inputs as without the drop
        plain = diffusion.forward_process(x0, seed=3, step=step, mask_id=mask_id, prompt_lens=pl, crop_prob=0.0)
        assert torch.equal(kw["mask"], plain.mask) and torch.equal(kw["weight"], plain.weight)
        assert torch.equal(kw["noisy"][~prompt], plain.noisy_ids[~prompt])
        for b in range(B):
            if not got[b]:
                assert torch.equal(kw["noisy"][b][prompt[b]], x0[b][prompt[b]])
    n = steps * B
    assert abs(drops - p_uncond * n) < 4 * (n * p_uncond * (1 - p_uncond)) ** 0.5, drops  # 57.6 ± 25


# ---------------------------------------------------------------------------------------------------------
# the trainer's machinery in SFT mode


@pytest.mark.parametrize("kind", ["mdm", "ar"])
def test_resume_is_bit_exact(files, tmp_path, kind):
    extra = {"p_uncond": 0.2} if kind == "mdm" else {}
    kw = dict(objective=kind, max_steps=6, save_every=2, val_every=3, sft_val=str(files["val"]), **extra)
    straight = sft_cfg(files, tmp_path / "straight", **kw)
    train(straight)
    half = sft_cfg(files, tmp_path / "half", stop_after=3, **kw)
    train(half)
    assert ckpt.latest(half.out).name == "step-3"
    train(sft_cfg(files, tmp_path / "half", resume=True, **kw))
    assert step_losses(straight.out) == step_losses(half.out)  # identical floats, per step
    assert [v["val_loss"] for v in vals(straight.out)] == [v["val_loss"] for v in vals(half.out)]
    wa, wb = ckpt.load_weights(ckpt.latest(straight.out)), ckpt.load_weights(ckpt.latest(half.out))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    if kind == "mdm":  # another drop rate draws other inputs: not the same run
        with pytest.raises(TrainError, match=r"p_uncond.*--force-resume"):
            train(sft_cfg(files, tmp_path / "half", resume=True, **{**kw, "p_uncond": 0.5}))


def test_a_non_finite_step_is_skipped(files, tmp_path, monkeypatch):
    monkeypatch.setenv("SMDM_INJECT_NONFINITE", "1")  # the loss of step index 1 (reported as step 2) is NaN
    train(sft_cfg(files, tmp_path / "r", max_steps=3, save_every=1, keep=5))
    rows = [r for r in metrics(tmp_path / "r") if "loss" in r]
    assert [r["skipped"] for r in rows] == [False, True, False]
    w1, w2 = ckpt.load_weights(tmp_path / "r" / "step-1"), ckpt.load_weights(tmp_path / "r" / "step-2")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_gradient_accumulation_split_equals_the_whole_batch(files, tmp_path):
    # per-sequence normalisation: the mean over 2 micro-batches of 4 is the mean over the batch of 8
    train(sft_cfg(files, tmp_path / "a", max_steps=3, p_uncond=0.25))
    train(sft_cfg(files, tmp_path / "b", max_steps=3, p_uncond=0.25, grad_accum=2))
    np.testing.assert_allclose(step_losses(tmp_path / "a"), step_losses(tmp_path / "b"), rtol=1e-5)


def test_init_from_takes_model_objective_and_tokenizer_and_mismatches_are_errors(files, tmp_path, capsys):
    from smdm.cli import main

    base = tmp_path / "base-ar"
    train(sft_cfg(files, base, objective="ar", max_steps=2))
    t = Trainer(sft_cfg(files, tmp_path / "ft", config=None, tokenizer=None, init_from=str(base), max_steps=2))
    assert t.kind == "ar" and t.cfg.config == "tiny" and t.model_config.causal
    assert t.peak_lr == 3e-3 and t.warmup == 1
    w = ckpt.load_weights(ckpt.latest(base))
    assert all(torch.equal(v, w[k]) for k, v in t.model.state_dict().items())  # the checkpoint's weights
    # the base run goes on and its keep-last-N prunes the --init-from step: the fine-tune's checkpoints
    # still hold the tokenizer (they copied it from that step at every save and silently lost it)
    tok = (ckpt.latest(base) / "tokenizer.json").read_bytes()
    (ckpt.latest(base) / "tokenizer.json").unlink()
    t.fit()
    t.dist.close()
    assert (ckpt.latest(t.out) / "tokenizer.json").read_bytes() == tok
    (ckpt.latest(base) / "tokenizer.json").write_bytes(tok)
    conf = ckpt.read_config(ckpt.latest(t.out))
    assert conf["init_from"] == str(ckpt.latest(base)) and conf["objective"] == "ar"
    assert conf["sft"]["train"] == str(files["train"]) and conf["sft"]["format"] == "plain"

    def err(*args):
        assert main(["train", "--sft", str(files["train"]), "--out", str(tmp_path / "x"), "--max-steps", "1",
                     "--seq-len", str(SEQ_LEN), *args]) == 2
        return capsys.readouterr().err

    assert "--objective mdm does not match --init-from" in err("--init-from", str(base), "--objective", "mdm")
    e = err("--init-from", str(base), "--config", "demo")
    assert "--config demo" in e and "a tiny model" in e and "leave --config out" in e
    other = write_jsonl(tmp_path / "other.json", ['{"model": {}}'])
    e = err("--init-from", str(base), "--tokenizer", str(other))
    assert f"--tokenizer {other} differs from" in e
    assert "--sft needs a tokenizer" in err("--config", "tiny")
    assert "--p-uncond (CFG training" in err("--init-from", str(base), "--objective", "ar", "--p-uncond", "0.1")
    assert "--sft and --data exclude each other" in err("--init-from", str(base), "--data", str(tmp_path))
    assert "exceeds the context" in err("--init-from", str(base), "--seq-len", "100000")
    assert "--init-from: " in err("--init-from", str(tmp_path / "missing"))
    w = ckpt.load_weights(ckpt.latest(base))  # a diverged base: named at once, not 20 skipped steps later
    w["head.weight"][0, 0] = float("nan")
    ckpt.save(tmp_path / "nan", 2, model_state=w, config=ckpt.read_config(ckpt.latest(base)), train_state={"step": 2},
              tokenizer_path=ckpt.latest(base) / "tokenizer.json")
    assert "1 weight tensor(s) hold NaN or inf (head.weight)" in err("--init-from", str(tmp_path / "nan"))
    assert main(["train", "--sft", str(files["train"]), "--init-from", str(base), "--out", str(base),
                 "--overwrite", "--max-steps", "1", "--seq-len", str(SEQ_LEN)]) == 2
    assert "whose checkpoints a fresh run deletes" in capsys.readouterr().err
    assert ckpt.latest(base) is not None
    assert main(["train", "--p-uncond", "0.1", "--out", str(tmp_path / "y")]) == 2
    assert "--p-uncond need --sft" in capsys.readouterr().err
    from test_train import make_dataset

    data = make_dataset(tmp_path / "data", n_docs=(40, 10))
    with pytest.raises(TrainError, match="is an SFT run, this one is a pretraining run"):
        Trainer(TrainConfig(config="tiny", data=str(data), out=str(base), objective="ar", resume=True))


def test_learning_check_sft_lowers_the_response_elbo(files, tmp_path):
    """SFT on the reversal task: the validation ELBO per response token falls far below its value at
    --init-from (a checkpoint of 2 steps; measured 8.47 -> 1.98 nats in 150 steps), and the model uses the
    prompt: the same responses under other prompts score worse (measured +1.40 nats per sequence). The ARM twin
    learns too (measured 6.06 -> 0.91 nats per response token in 100 steps from scratch)."""
    base = tmp_path / "base"
    train(sft_cfg(files, base, max_steps=2))
    out = tmp_path / "ft"
    t = train(sft_cfg(files, out, config=None, tokenizer=None, init_from=str(base), max_steps=150, batch_size=16,
                      lr=5e-3, val_every=150, val_samples=8, val_batches=3, sft_val=str(files["val"])))
    v = vals(out)
    assert [x["step"] for x in v] == [0, 150] and v[0]["val_kind"] == "elbo"
    assert v[-1]["val_loss"] < v[0]["val_loss"] - 4.0 and v[-1]["val_loss"] < 2.5, v
    # conditional: the same responses under other prompts (rotated by one) are less likely
    from smdm import diffusion

    ex = t.val_examples
    b = ex.rows(np.arange(32))
    ids, pl = b["input_ids"], b["prompt_lens"]
    rot = ids.clone()
    for i in range(32):  # prompt of example i + 1, response of example i, when the prompt lengths agree
        j = (i + 1) % 32
        if pl[i] == pl[j]:
            rot[i, : pl[i]] = ids[j, : pl[j]]
    same = (rot != ids).any(1)
    assert same.sum() >= 5
    kw = dict(prompt_lens=pl, n_samples=16, seed=1)
    good = diffusion.elbo_nll(t.model.eval(), ids, **kw).nll[same]
    bad = diffusion.elbo_nll(t.model, rot, **kw).nll[same]
    assert (bad - good).mean() > 0.5, (good, bad)

    train(sft_cfg(files, tmp_path / "ar", objective="ar", max_steps=100, batch_size=16, lr=5e-3, val_every=100,
                  val_batches=3, sft_val=str(files["val"])))
    v = vals(tmp_path / "ar")
    assert v[0]["val_kind"] == "exact" and v[0]["val_stderr"] == 0
    assert v[-1]["val_loss"] < v[0]["val_loss"] - 3.0 and v[-1]["val_loss"] < 1.5, v


def test_checkpoint_loads_and_runs_eval_gsm8k_and_generate(files, tmp_path, capsys):
    import smdm
    from smdm.cli import main

    out = tmp_path / "gsm"
    train(sft_cfg(files, out, sft=str(files["gsm8k"]), sft_format="gsm8k", seq_len=64, max_steps=2))
    model, tok = smdm.load(out)
    conf = ckpt.read_config(ckpt.latest(out))
    assert conf["sft"]["format"] == "gsm8k" and conf["sft"]["prompt_field"] == "question"
    assert conf["sft"]["examples"] == 8 and conf["sft"]["p_uncond"] == 0.0 and conf["train"]["sft"]
    assert tok is not None and (ckpt.latest(out) / "tokenizer.json").read_bytes() == files["tok"].read_bytes()
    capsys.readouterr()
    assert main(["eval", "gsm8k", "--ckpt", str(out), "--data", str(files["gsm8k"]), "--limit", "3",
                 "--gen-length", "8", "--device", "cpu"]) == 0
    assert "n=3 0-shot  acc" in capsys.readouterr().out
    assert main(["generate", "--ckpt", str(out), "--prompt", "Question: what is 2 plus 3?\nAnswer:",
                 "--gen-length", "8", "--device", "cpu"]) == 0


@pytest.mark.dist
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_torchrun_two_ranks_train_the_global_batch(files, tmp_path):
    """2 processes (DDP, gloo): each rank reads its contiguous share of the epoch's order, and the first step's
    loss is the SFT loss of the whole global batch (masks keyed by global sample index, per-sequence mean),
    computed here in one process from the same initial weights."""
    import os
    import subprocess
    import sys

    from smdm import diffusion

    out, windows = tmp_path / "ddp", tmp_path / "w"
    windows.mkdir()
    args = ["--config", "tiny", "--sft", str(files["train"]), "--tokenizer", str(files["tok"]), "--out", str(out),
            "--seq-len", str(SEQ_LEN), "--batch-size", "8", "--max-steps", "2", "--p-uncond", "0.3", "--lr", "3e-3",
            "--val-every", "0", "--save-every", "0", "--threads", "1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "smdm.cli",
           "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SMDM_LOG_WINDOWS": str(windows), "TMPDIR": str(tmp_path)}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-4000:])

    t = Trainer(sft_cfg(files, tmp_path / "ref", max_steps=2, p_uncond=0.3))  # the same initial weights
    shares = [sft.SftDataset(t.train_examples, 4, rank=r, world_size=2) for r in range(2)]
    for r in range(2):
        logged = [json.loads(x)["index"] for x in (windows / f"windows-rank{r}.jsonl").read_text().splitlines()]
        assert logged == [shares[r].example_ids(0, b).tolist() for b in range(2)]
    batch = [t.train_examples.rows(d.example_ids(0, 0)) for d in shares]
    x0 = torch.cat([b["input_ids"] for b in batch])
    pl = torch.cat([b["prompt_lens"] for b in batch])
    fp = diffusion.forward_process(x0, seed=0, step=0, mask_id=t.mask_id, prompt_lens=pl, p_uncond=0.3,
                                   crop_prob=0.0)
    with torch.no_grad():
        ref = diffusion.sft_loss(t.model, fp.noisy_ids, x0, fp.mask, fp.weight, pl)
    t.dist.close()
    assert step_losses(out)[0] == pytest.approx(float(ref), rel=1e-5)
    import smdm

    model, tok = smdm.load(out)
    assert tok is not None and model.config.vocab_size == t.model_config.vocab_size


def test_arm_validation_divides_by_the_tokens_it_scores(files, tmp_path):
    """With an empty prompt the ARM has no prediction for the first response token (no BOS): validation
    divided its NLL by a count that included that token, so the ARM's per-token figure came out low."""
    rows = [{"prompt": "", "response": r["response"]} for r in reverse_pairs(6, 2)]
    val = write_jsonl(tmp_path / "v.jsonl", rows)
    t = train(sft_cfg(files, tmp_path / "r", objective="ar", sft_val=str(val), max_steps=1, val_every=1,
                      val_batches=1, batch_size=8))
    v = [r for r in metrics(t.out) if r.get("event") == "val"][-1]
    ex = t.val_examples
    batch = ex.rows(np.arange(len(ex)))
    with torch.no_grad():
        nll, scored = sft.ar_sft_nll(t.model.eval(), batch["input_ids"], batch["prompt_lens"], batch["lengths"])
    assert v["val_tokens"] == int(scored.sum()) == int((batch["lengths"] - 1).sum())
    assert v["val_loss"] == pytest.approx(float(nll.sum()) / int(scored.sum()), rel=1e-5)

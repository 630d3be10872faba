# python -m pytest -q tests   (shared fixtures; each test file starts with its own command)
"""Shared fixtures. Keep this file small: fixtures used by one file belong in that file."""

from __future__ import annotations

import os

import pytest

# A small multi-document corpus: enough text for a byte-level BPE of a few hundred ids, some Unicode.
TINY_TEXTS = [
    f"def f{i}(x):\n    return x * {i} + {i % 7}  # naïve café {i}\n\nclass C{i}:\n    pass\n" * (1 + i % 5)
    for i in range(120)
]


@pytest.fixture(autouse=True)
def _rayon_env_restored():
    """`bench ... --threads N` sets RAYON_NUM_THREADS in its own process (for the Rust pool it builds later); a
    test that runs it in-process must not leave a later test's subprocesses on one Rust thread."""
    names = ("RAYON_NUM_THREADS", "RAYON_RS_NUM_THREADS")
    saved = {k: os.environ.get(k) for k in names}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_texts() -> list[str]:
    return list(TINY_TEXTS)


@pytest.fixture(scope="session")
def tiny_jsonl(tmp_path_factory, tiny_texts):
    """A .jsonl file with one document per line (field `text`)."""
    import json

    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(tiny_texts)))
    return path


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, tiny_jsonl):
    """`smdm prepare` output (smdm format, trained BPE of 300 ids, small shards): DIR with train/ val/."""
    from smdm.data_cli import prepare

    out = tmp_path_factory.mktemp("prepared") / "out"
    prepare([str(tiny_jsonl)], out, vocab_size=300, val_fraction=0.1, shard_tokens=4000, progress=False,
            log=lambda msg: None)
    return out


@pytest.fixture
def loss_inputs(monkeypatch) -> list:
    """Every (kind, inputs) the trainer hands to its loss module (`smdm.train.Objective`), copied."""
    import torch
    from smdm.train import Objective

    seen = []
    original = Objective.forward

    def forward(self, kind, **kw):
        seen.append((kind, {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}))
        return original(self, kind, **kw)

    monkeypatch.setattr(Objective, "forward", forward)
    return seen


@pytest.fixture
def one_thread(monkeypatch):
    """One torch thread here and in subprocesses: tiny models run fast on a busy 2-core box, and every process
    reduces floats in the same order (bit-exact comparisons across processes)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory, prepared):
    """A random MDM and ARM twin (and an ARM with another tokenizer) saved with the prepared data's tokenizer."""
    from smdm import checkpoint
    from smdm.model import build_model, config_by_name
    from tokenizers import Tokenizer

    root = tmp_path_factory.mktemp("frontier")
    V = Tokenizer.from_file(str(prepared / "tokenizer.json")).get_vocab_size() + 1  # + the mask id
    out = {}
    for kind, causal, seed in (("mdm", False, 0), ("ar", True, 1)):
        model = build_model(config_by_name("tiny", vocab_size=V, causal=causal, max_seq_len=64), seed=seed)
        out[kind] = checkpoint.save(root / kind, 1, model_state=model.state_dict(),
                                    config={"model": model.config.to_dict(), "objective": kind},
                                    train_state={"step": 1}, tokenizer_path=prepared / "tokenizer.json")
    other = root / "other-tokenizer.json"
    other.write_text((prepared / "tokenizer.json").read_text().replace('"[UNK]"', '"[OOV]"', 1) + " ")
    model = build_model(config_by_name("tiny", vocab_size=V, causal=True, max_seq_len=64), seed=2)
    out["other"] = checkpoint.save(root / "other", 1, model_state=model.state_dict(),
                                   config={"model": model.config.to_dict(), "objective": "ar"},
                                   train_state={"step": 1}, tokenizer_path=other)
    return out

# python -m pytest -q tests   (shared fixtures; each test file starts with its own command)
"""Shared fixtures. Keep this file small: fixtures used by one file belong in that file."""

from __future__ import annotations

import pytest

# A small multi-document corpus: enough text for a byte-level BPE of a few hundred ids, some Unicode.
TINY_TEXTS = [
    f"def f{i}(x):\n    return x * {i} + {i % 7}  # naïve café {i}\n\nclass C{i}:\n    pass\n" * (1 + i % 5)
    for i in range(120)
]


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

# pytest tests/test_fork.py
"""The Rust core in a forked child (a fork-started DataLoader worker, `multiprocessing` on Linux): after the
parent has run parallel work, the child's parallel calls must finish and give the parent's results.

rayon's global pool would hang there (the child inherits the pool but not its threads); the crate runs its
parallel work on a pool of the current process (rust/src/pool.rs). The check runs in a fresh interpreter
(forking the test process itself would fork pytest's threads too), with two Rust threads so that every call
below takes its parallel path."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(r"""
    import hashlib, os, sys, time
    import numpy as np
    import smdm._core as c

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 4000, size=200).astype(np.uint64)  # ~400k tokens: many pack runs
    tokens = rng.integers(0, 1000, size=int(lengths.sum())).astype(np.uint32)
    x = rng.integers(0, 1000, size=(64, 1024)).astype(np.int64)  # 65536 tokens, batch > 1
    logits = rng.standard_normal((64, 2048)).astype(np.float32)  # 131072 logits
    rows = np.arange(64, dtype=np.int64)
    texts = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 40 for i in range(300)]

    def work():
        h = hashlib.sha256()
        for a in c.pack_documents(tokens, lengths, 1000, 1001):
            h.update(a.tobytes())
        for v in c.forward_process(x, seed=1, step=2, mask_id=1000):
            h.update(np.asarray(v).tobytes())
        for a in c.choose_tokens(logits, rows, rows, rows, 1.0, "prob"):
            h.update(a.tobytes())
        tok = c.Tokenizer.train_bpe(texts, 400)
        h.update(repr(tok.encode(texts)).encode())
        h.update(repr(tok.encode_pack(texts)[0].tolist()).encode())
        return h.hexdigest()

    parent = work()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.write(w, work().encode())
        os._exit(0)
    os.close(w)
    deadline = time.monotonic() + float(sys.argv[1])
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            child = os.read(r, 100).decode()
            print("same" if child == parent else f"differ: {child!r} vs {parent!r}", status)
            sys.exit(0)
        time.sleep(0.05)
    os.kill(pid, 9)
    print("child hung")
""")


def test_parallel_calls_in_a_forked_child_finish_with_the_parents_results():
    env = dict(os.environ, RAYON_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-c", SCRIPT, "60"], capture_output=True, text=True, timeout=180, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "same 0", res.stdout + res.stderr


@pytest.mark.skipif(not (hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("prlimit")
                         and shutil.which("setpriv")), reason="needs root, prlimit and setpriv")
def test_no_thread_to_start_is_an_oserror_not_a_panic():
    """Under a process limit that forbids any new thread (prlimit --nproc=1 as an unprivileged user), a parallel
    call raises OSError naming the cause; rayon's global pool would panic (PanicException) there."""
    script = ("import numpy as np, smdm._core as c\n"
              "try:\n"
              "    c.forward_process(np.zeros((64, 1024), np.int64), seed=0, step=0, mask_id=9)\n"
              "    print('ran')\n"
              "except BaseException as e:\n"
              "    print(type(e).__name__, e)\n")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("RAYON_NUM_THREADS", None)
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one CPU: the Rust core starts no worker thread")
    import pwd

    # a uid no account has: --nproc counts every process of the uid on the machine (a daemon running as
    # `nobody` would make Python's own start fail)
    taken = {p.pw_uid for p in pwd.getpwall()}
    uid = next(u for u in range(40000 + os.getpid() % 20000, 70000) if u not in taken)
    nobody = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", sys.executable]
    up = subprocess.run([*nobody, "-c", "import smdm._core"], capture_output=True, text=True, timeout=120, env=env,
                        cwd="/")
    if up.returncode:  # e.g. a Python whose files only root can read
        pytest.skip(f"this Python cannot import smdm._core as an unprivileged user: {up.stderr.strip()[-200:]}")
    res = subprocess.run(["prlimit", "--nproc=1", *nobody, "-c", script], capture_output=True, text=True,
                         timeout=120, env=env, cwd="/")
    assert res.stdout.startswith("OSError cannot start the Rust core's worker threads"), res.stdout + res.stderr

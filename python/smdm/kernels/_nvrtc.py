"""NVRTC (CuPy) backend: the kernels of csrc/kernels.cu compiled at run time by `cupy.RawModule`, for machines
with a pip-installed torch and CuPy but no CUDA toolkit. Exposes the same two functions as the pybind module
(`unmask_step`, `attention`); the Python layer has already validated the arguments and allocated outputs.
Launches go to torch's current stream.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

UNMASK_THREADS = 1024  # = smdm::UNMASK_THREADS
ATTN_WARPS = 4
ATTN_BLOCK_N = 64
UNMASK_SCRATCH_BYTES = 2720  # sizeof(smdm::UnmaskScratch), static shared memory of the sampler kernels
_DT = {"float32": 0, "bfloat16": 1, "float16": 2}


def _p(t) -> np.uint64:
    """A device pointer as a kernel argument (8 bytes, like any pointer parameter); 0 for None."""
    return np.uint64(0 if t is None else t.data_ptr())


class NvrtcModule:
    def __init__(self, src: Path):
        import cupy

        self._cupy = cupy
        code = (src / "kernels.cu").read_text()
        self._rows = {
            (dt, unc): f"smdm::unmask_rows_kernel<{dt}, {'true' if unc else 'false'}>"
            for dt in (0, 1, 2)
            for unc in (False, True)
        }
        self._attn = {
            (dt, d): f"smdm::flash_attn_fwd_flat<{dt}, {d}, {ATTN_WARPS}>" for dt in (1, 2) for d in (64, 128)
        }
        names = [*self._rows.values(), *self._attn.values(), "smdm::unmask_commit_kernel"]
        self._mod = cupy.RawModule(code=code, options=("-std=c++17", f"-I{src}"), name_expressions=names)
        self._mod.compile()

    def _launch(self, name: str, grid, block, args, smem: int, device_index: int):
        import torch

        cupy = self._cupy
        with cupy.cuda.Device(device_index):
            fn = self._mod.get_function(name)
            # always, as the nvcc launchers do: without the opt-in a block gets 48 KiB of shared memory in all,
            # static included, so `smem > 48 KiB` was the wrong test for the sampler kernels (2720 static
            # bytes): V or L in (11608, 12288] failed to launch
            fn.max_dynamic_shared_size_bytes = smem
            stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device_index).cuda_stream)
            with stream:
                fn(grid, block, args, shared_mem=smem)

    def unmask_step(
        self,
        logits,
        uncond,
        candidates,
        seeds,
        step,
        pos_offset,
        cfg_scale,
        temperature,
        top_k,
        top_p,
        conf_mode,
        n_commit,
        tau,
        tokens,
        pred,
        conf,
        committed,
    ):
        B, L, V = logits.shape
        if B * L == 0:
            return
        self._rows_launch(
            logits,
            uncond,
            candidates,
            seeds,
            L,
            None,
            pos_offset,
            None,
            step,
            cfg_scale,
            temperature,
            top_k,
            top_p,
            conf_mode,
            pred,
            conf,
            B * L,
        )
        self._commit_launch(pred, conf, candidates, n_commit, tau, B, L, tokens, committed)

    def choose_tokens(
        self, logits, seeds, positions, steps, temperature, top_k, top_p, conf_mode, tokens, conf
    ):
        N = logits.shape[0]
        if N:
            self._rows_launch(
                logits,
                None,
                None,
                seeds,
                1,
                positions,
                0,
                steps,
                0,
                0.0,
                temperature,
                top_k,
                top_p,
                conf_mode,
                tokens,
                conf,
                N,
            )

    def select_positions(self, conf, candidates, n_commit, tau, committed):
        B, P = conf.shape
        if B * P:
            self._commit_launch(None, conf, candidates, n_commit, tau, B, P, None, committed)

    def _rows_launch(
        self,
        logits,
        uncond,
        cand,
        seeds,
        seed_div,
        positions,
        pos_offset,
        steps,
        step,
        cfg_scale,
        temperature,
        top_k,
        top_p,
        conf_mode,
        pred,
        conf,
        rows,
    ):
        V = logits.shape[-1]
        L = logits.shape[1] if logits.dim() == 3 else 1
        dt = _DT[str(logits.dtype).replace("torch.", "")]
        self._launch(
            self._rows[(dt, uncond is not None)],
            (rows,),
            (UNMASK_THREADS,),
            (
                _p(logits),
                _p(uncond),
                _p(cand),
                _p(seeds),
                np.int32(seed_div),
                _p(positions),
                np.int64(pos_offset),
                _p(steps),
                np.int64(step),
                np.int32(L),
                np.int32(V),
                np.float32(cfg_scale + 1.0),
                np.float32(temperature),
                np.int32(min(max(int(top_k), 0), V)),
                np.float64(top_p),
                np.int32(conf_mode),
                _p(pred),
                _p(conf),
            ),
            V * 4,
            logits.device.index or 0,
        )

    def _commit_launch(self, pred, conf, cand, n_commit, tau, B, L, tokens, committed):
        self._launch(
            "smdm::unmask_commit_kernel",
            (B,),
            (UNMASK_THREADS,),
            (
                _p(pred),
                _p(conf),
                _p(cand),
                _p(n_commit),
                np.float32(tau),
                np.int32(0 if n_commit is not None else 1),
                np.int32(L),
                _p(tokens),
                np.int64(0 if tokens is None else tokens.stride(0)),
                _p(committed),
            ),
            L * 4,
            conf.device.index or 0,
        )

    def attention(self, q, k, v, q_seg, k_seg, out, scale):
        B, Hq, Lq, D = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        if B * Hq * Lq == 0:
            return
        dt = _DT[str(q.dtype).replace("torch.", "")]
        bm = 16 * ATTN_WARPS
        smem = (bm + 2 * ATTN_BLOCK_N) * D * 2 + ATTN_BLOCK_N * 4
        st = [np.int64(s) for t in (q, k, v, out) for s in t.stride()[:3]]
        seg_st = [
            np.int64(0 if q_seg is None else q_seg.stride(0)),
            np.int64(0 if k_seg is None else k_seg.stride(0)),
        ]
        self._launch(
            self._attn[(dt, D)],
            ((Lq + bm - 1) // bm, Hq, B),
            (32 * ATTN_WARPS,),
            (
                _p(q),
                _p(k),
                _p(v),
                _p(out),
                _p(q_seg),
                _p(k_seg),
                *st,
                *seg_st,
                np.int32(Lq),
                np.int32(Lk),
                np.int32(Hq),
                np.int32(Hkv),
                np.float32(scale * 1.4426950408889634),
            ),
            smem,
            q.device.index or 0,
        )

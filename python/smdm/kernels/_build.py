"""Finding, building and compile-checking the CUDA sources of smdm.

Build at first use, never into the package directory:
  * nvcc path: `torch.utils.cpp_extension.load` (nvcc + pybind11 + ninja) of csrc/{bindings.cpp, sampler.cu,
    attention.cu} into `$SMDM_CACHE_DIR` or `$XDG_CACHE_HOME/smdm/kernels/<hash>` (default ~/.cache/...),
    under a file lock, for the architecture of the visible GPU(s); the hash covers the sources, torch,
    CUDA and Python versions and the architectures, so a changed source rebuilds.
  * NVRTC path (no CUDA toolkit, CuPy installed): csrc/kernels.cu compiled by CuPy (`cupy.RawModule`) and
    launched on torch's current stream; it exposes the same two functions as the pybind module.
  * `SMDM_KERNEL_BUILD` picks the path: `auto` (default: nvcc when a CUDA toolkit is found, else NVRTC),
    `nvcc` (never NVRTC: no toolkit is a KernelBuildError), `nvrtc` (NVRTC even where nvcc exists). A failed
    build is remembered per process and per mode: setting another mode and calling `load()` again retries.
`check_sources()` compiles every source without a GPU: nvcc `-c` per file (kernels for sm_90a, sm_80 and
sm_89; the torch launchers and bindings against torch's headers) and NVRTC (libnvrtc through ctypes).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

KERNEL_HEADERS = ("smdm_common.cuh", "unmask_sampler.cuh", "flash_attention.cuh")
LAUNCHERS = ("sampler.cu", "attention.cu")
BINDINGS = "bindings.cpp"
NVRTC_UNIT = "kernels.cu"
CHECK_ARCHS = ("sm_90a", "sm_80", "sm_89")
BUILD_MODES = ("auto", "nvcc", "nvrtc")  # values of $SMDM_KERNEL_BUILD


class KernelBuildError(RuntimeError):
    """The CUDA kernels could not be built or loaded (the message says why and how to fix it)."""


# --------------------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------------------
def source_dir() -> Path:
    """Directory holding the CUDA sources: $SMDM_CSRC, else `smdm/kernels/csrc` next to this module (the real
    files: the wheel ships them as package data, and the repository's top-level `csrc` is a symlink to them),
    else `csrc/` of a source checkout."""
    here = Path(__file__).resolve().parent
    candidates = []
    if os.environ.get("SMDM_CSRC"):
        candidates.append(Path(os.environ["SMDM_CSRC"]))
    candidates += [here / "csrc", here.parents[2] / "csrc"]
    for c in candidates:
        if (c / "smdm_common.cuh").is_file():
            return c
    raise KernelBuildError(
        "smdm CUDA sources not found (looked in: "
        + ", ".join(str(c) for c in candidates)
        + "); set SMDM_CSRC to the csrc/ directory of an smdm checkout"
    )


def _sources_digest(src: Path) -> str:
    h = hashlib.sha256()
    for name in sorted(p.name for p in src.iterdir() if p.suffix in (".cuh", ".cu", ".cpp", ".h")):
        h.update(name.encode() + b"\0" + (src / name).read_bytes() + b"\0")
    return h.hexdigest()


def cache_root() -> Path:
    if os.environ.get("SMDM_CACHE_DIR"):
        return Path(os.environ["SMDM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "smdm" / "kernels"


# --------------------------------------------------------------------------------------------------------
# toolchain discovery
# --------------------------------------------------------------------------------------------------------
def _pip_cuda_home() -> Path | None:
    """CUDA_HOME of the PyPI nvcc (`pip install nvidia-cuda-nvcc nvidia-cuda-cccl`): .../nvidia/cu13."""
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for sub in ("cu13", "cu12", "cuda_nvcc"):
            home = Path(base) / "nvidia" / sub
            if (home / "bin" / "nvcc").is_file():
                return home
    return None


def find_cuda_home() -> Path | None:
    """$CUDA_HOME / $CUDA_PATH, then the PyPI nvcc, then `nvcc` on PATH, then /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and (Path(os.environ[var]) / "bin" / "nvcc").is_file():
            return Path(os.environ[var])
    pip_home = _pip_cuda_home()
    if pip_home is not None:
        return pip_home
    nvcc = shutil.which("nvcc")
    if nvcc:
        return Path(nvcc).resolve().parent.parent
    if Path("/usr/local/cuda/bin/nvcc").is_file():
        return Path("/usr/local/cuda")
    return None


def _cuda_env(home: Path) -> dict:
    env = dict(os.environ)
    env["CUDA_HOME"] = str(home)
    env["PATH"] = str(home / "bin") + os.pathsep + env.get("PATH", "")
    return env


def _include_dirs(home: Path) -> list[str]:
    dirs = [str(home / "include")]
    for extra in ("include/cccl", "cccl/include"):
        if (home / extra).is_dir():
            dirs.append(str(home / extra))
    return dirs


def _torch_cxx_std() -> str:
    """The C++ standard torch's headers need (c++20 for recent torch, c++17 before)."""
    import torch.utils.cpp_extension as ce

    for inc in ce.include_paths():
        aten = Path(inc) / "ATen" / "ATen.h"
        if aten.is_file():
            return "c++20" if "C++20" in aten.read_text(errors="replace") else "c++17"
    return "c++17"


def nvcc_version(home: Path) -> str:
    out = subprocess.run([str(home / "bin" / "nvcc"), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "?"


def _cudart_header_version(home: Path) -> str | None:
    hdr = home / "include" / "cuda_runtime_api.h"
    if not hdr.is_file():
        return None
    m = re.search(r"#define\s+CUDART_VERSION\s+(\d+)", hdr.read_text(errors="replace"))
    if not m:
        return None
    v = int(m.group(1))
    return f"{v // 1000}.{(v % 1000) // 10}"


def gencode(arch: str) -> str:
    """'sm_90a' -> '-gencode=arch=compute_90a,code=sm_90a'."""
    num = arch[3:]
    return f"-gencode=arch=compute_{num},code=sm_{num}"


def device_archs() -> list[str]:
    """Architectures of the visible GPUs: sm_90a for Hopper (H100/H200), sm_XY otherwise."""
    import torch

    archs = set()
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        archs.add(f"sm_{major}{minor}" + ("a" if (major, minor) == (9, 0) else ""))
    return sorted(archs)


# --------------------------------------------------------------------------------------------------------
# JIT build (nvcc) and NVRTC fallback (CuPy)
# --------------------------------------------------------------------------------------------------------
_lock = threading.Lock()
_module = None
_module_error: KernelBuildError | None = None


def build_mode() -> str:
    """The build path asked for by $SMDM_KERNEL_BUILD: "auto" (default), "nvcc" or "nvrtc" (module docstring).
    Any other value is a ValueError: a misspelt switch must not quietly build another way."""
    raw = os.environ.get("SMDM_KERNEL_BUILD", "")
    mode = raw.strip().lower() or "auto"
    if mode not in BUILD_MODES:
        raise ValueError(
            f"SMDM_KERNEL_BUILD must be one of {', '.join(BUILD_MODES)} (auto: nvcc when a CUDA toolkit is "
            f"found, else NVRTC through CuPy; nvcc: never NVRTC; nvrtc: NVRTC even where nvcc exists), got {raw!r}"
        )
    return mode


def load(verbose: bool = False):
    """The kernel module (built on first use, by the path $SMDM_KERNEL_BUILD selects). Raises KernelBuildError
    with the reason when impossible (ValueError for a bad SMDM_KERNEL_BUILD)."""
    global _module, _module_error
    mode = build_mode()
    with _lock:
        if _module is not None:
            return _module
        # a failure is final for its mode only (an error set from outside, without a mode, for every mode)
        if _module_error is not None and getattr(_module_error, "build_mode", mode) == mode:
            raise _module_error
        try:
            _module = _load_uncached(verbose, mode)
        except KernelBuildError as e:
            e.build_mode = mode
            _module_error = e
            raise
        except Exception as e:  # CuPy's CompileException, an unwritable cache dir, a broken nvcc, ...
            # callers (available(), backend="auto") catch KernelBuildError only: anything else would crash them
            _module_error = KernelBuildError(
                f"building or loading the smdm CUDA kernels failed: {type(e).__name__}: {e}\n"
                f"(cache: {cache_root()}; SMDM_KERNELS=reference uses the PyTorch references)"
            )
            _module_error.build_mode = mode
            raise _module_error from e
        return _module


def _load_uncached(verbose: bool, mode: str = "auto"):
    import torch

    if not torch.cuda.is_available():
        raise KernelBuildError("smdm CUDA kernels need a CUDA device (torch.cuda.is_available() is False)")
    src = source_dir()
    home = None if mode == "nvrtc" else find_cuda_home()
    if home is not None:
        return _build_nvcc(src, home, verbose)
    if mode == "nvcc":
        raise KernelBuildError(
            "SMDM_KERNEL_BUILD=nvcc but no CUDA toolkit (nvcc) was found ($CUDA_HOME, $CUDA_PATH, the PyPI "
            "nvidia-cuda-nvcc, PATH, /usr/local/cuda): `pip install nvidia-cuda-nvcc nvidia-cuda-cccl pybind11 "
            "ninja` or set CUDA_HOME; SMDM_KERNEL_BUILD=auto allows the NVRTC (CuPy) build instead."
        )
    try:
        import cupy  # noqa: F401
    except ImportError:
        if mode == "nvrtc":
            raise KernelBuildError(
                "SMDM_KERNEL_BUILD=nvrtc but CuPy is not installed: `pip install cupy-cuda13x` (matching "
                "torch's CUDA major version), or unset SMDM_KERNEL_BUILD to build with nvcc."
            ) from None
        raise KernelBuildError(
            "cannot build the smdm CUDA kernels: no CUDA toolkit (nvcc) found and CuPy is not installed. "
            "Install one of: `pip install nvidia-cuda-nvcc nvidia-cuda-cccl pybind11 ninja` (nvcc, matching "
            "torch's CUDA major version), or `pip install cupy-cuda13x` (NVRTC); or set CUDA_HOME."
        ) from None
    from smdm.kernels._nvrtc import NvrtcModule

    return NvrtcModule(src)


def _build_nvcc(src: Path, home: Path, verbose: bool):
    import torch
    import torch.utils.cpp_extension as ce
    from filelock import FileLock

    archs = device_archs()
    tag = "|".join(
        [
            _sources_digest(src),
            torch.__version__,
            str(torch.version.cuda),
            nvcc_version(home),
            sys.version.split()[0],
            ",".join(archs),
        ]
    )
    digest = hashlib.sha256(tag.encode()).hexdigest()[:16]
    build_dir = cache_root() / digest
    build_dir.mkdir(parents=True, exist_ok=True)
    old_home = ce.CUDA_HOME
    ldflags = []
    cudart = None
    if not any((home / d / "libcudart.so").exists() for d in ("lib", "lib64")):
        # the PyPI runtime ships only libcudart.so.<major>: give the linker an unversioned name for it
        found = sorted((home / "lib").glob("libcudart.so.*"))
        if found:
            cudart = found[0]
            ldflags.append(f"-L{build_dir / 'lib'}")
    cflags = ["-O3", f"-std={_torch_cxx_std()}"]
    cuda_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", *(gencode(a) for a in archs)]
    here = Path(sys.executable).parent  # `pip install ninja` in a venv that is not activated: use its ninja
    if shutil.which("ninja") is None and (here / "ninja").is_file():
        os.environ["PATH"] = f"{here}{os.pathsep}{os.environ.get('PATH', '')}"
    try:
        ce.CUDA_HOME = str(home)  # cpp_extension resolved CUDA_HOME at import; point it at the toolkit found
        os.environ.setdefault("CUDA_HOME", str(home))
        with FileLock(str(build_dir) + ".lock"):
            if cudart is not None:
                _link_cudart(build_dir / "lib", cudart)
            # torch's own build lock (`FileBaton`, a file whose mere existence blocks) stays behind when a
            # build is killed (timeout, OOM): every later build would wait on it forever. Under our OS lock no
            # other smdm build runs in this directory, so a leftover one is stale.
            (build_dir / "lock").unlink(missing_ok=True)
            if not any(build_dir.glob("*.so")):
                msg = f"smdm: building the CUDA kernels for {','.join(archs)} into {build_dir} (first use)"
                print(msg, file=sys.stderr, flush=True)
            return ce.load(
                name=f"smdm_kernels_{digest}",
                sources=[str(src / BINDINGS), *(str(src / f) for f in LAUNCHERS)],
                extra_include_paths=[str(src), *_include_dirs(home)],
                extra_cflags=cflags,
                extra_cuda_cflags=cuda_flags,
                extra_ldflags=ldflags,
                build_directory=str(build_dir),
                verbose=verbose,
            )
    except Exception as e:  # compiler errors surface as RuntimeError / subprocess errors
        raise KernelBuildError(
            f"building the smdm CUDA kernels with nvcc from {home} failed in {build_dir}: {e}\n"
            "Re-run `smdm kernels build --verbose` for the full compiler log, or set SMDM_KERNELS=reference."
        ) from e
    finally:
        ce.CUDA_HOME = old_home


def _link_cudart(shim: Path, target: Path) -> None:
    """`shim/libcudart.so` -> `target`, replacing a link to anything else (a dangling link left by a deleted
    or moved environment with the same versions, hence the same cache directory: `exists()` is False for it
    and a plain `symlink_to` raised FileExistsError on every later build). Atomic (rename over the old link)."""
    shim.mkdir(parents=True, exist_ok=True)
    link = shim / "libcudart.so"
    if link.is_symlink() and os.readlink(link) == str(target):
        return
    tmp = shim / f".libcudart.so.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


# --------------------------------------------------------------------------------------------------------
# compile check (no GPU needed)
# --------------------------------------------------------------------------------------------------------
class CheckResult:
    def __init__(self, name: str, tool: str, ok: bool | None, seconds: float, log: str):
        self.name, self.tool, self.ok, self.seconds, self.log = name, tool, ok, seconds, log

    def status(self) -> str:
        return {True: "ok", False: "FAILED", None: "skipped"}[self.ok]


def _run(cmd: list[str], env: dict | None = None, cwd: str | None = None) -> tuple[bool, float, str]:
    import time

    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    return p.returncode == 0, time.perf_counter() - t0, (" ".join(cmd) + "\n" + p.stdout + p.stderr).strip()


def check_sources(
    archs: tuple[str, ...] = CHECK_ARCHS, launchers: bool = True, nvrtc: bool = True, jobs: int = 2
) -> list[CheckResult]:
    """Compile every CUDA source with `-c` (and through NVRTC); returns one result per (file, tool)."""
    src = source_dir()
    home = find_cuda_home()
    out_dir = Path(tempfile.mkdtemp(prefix="smdm-kcheck-"))
    jobs_list = []  # (name, tool, cmd, env)
    results: list[CheckResult] = []
    if home is None:
        results.append(
            CheckResult(
                "*.cu",
                "nvcc",
                None,
                0.0,
                "nvcc not found: pip install nvidia-cuda-nvcc nvidia-cuda-cccl (or set CUDA_HOME)",
            )
        )
    else:
        env = _cuda_env(home)
        nvcc = str(home / "bin" / "nvcc")
        inc = [f"-I{src}", *(f"-I{d}" for d in _include_dirs(home))]
        jobs_list.append(
            (
                NVRTC_UNIT + " (kernels)",
                f"nvcc {'+'.join(archs)}",
                [
                    nvcc,
                    "-std=c++17",
                    *(gencode(a) for a in archs),
                    *inc,
                    "-c",
                    str(src / NVRTC_UNIT),
                    "-o",
                    str(out_dir / "kernels.o"),
                ],
                env,
            )
        )
        if launchers:
            import torch.utils.cpp_extension as ce

            std = _torch_cxx_std()
            tinc = [f"-I{p}" for p in ce.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
            defs = ["-DTORCH_EXTENSION_NAME=smdm_kernels_check", "-DTORCH_API_INCLUDE_EXTENSION_H"]
            for f in LAUNCHERS:
                jobs_list.append(
                    (
                        f + " (launcher)",
                        f"nvcc {archs[0]}",
                        [
                            nvcc,
                            f"-std={std}",
                            gencode(archs[0]),
                            "--expt-relaxed-constexpr",
                            *inc,
                            *tinc,
                            *defs,
                            "-c",
                            str(src / f),
                            "-o",
                            str(out_dir / (f + ".o")),
                        ],
                        env,
                    )
                )
            cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"
            jobs_list.append(
                (
                    BINDINGS + " (bindings)",
                    Path(cxx).name,
                    [
                        cxx,
                        f"-std={std}",
                        "-fPIC",
                        *inc,
                        *tinc,
                        *defs,
                        "-c",
                        str(src / BINDINGS),
                        "-o",
                        str(out_dir / "bindings.o"),
                    ],
                    env,
                )
            )
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        futs = [(name, tool, ex.submit(_run, cmd, env)) for name, tool, cmd, env in jobs_list]
        for name, tool, fut in futs:
            ok, secs, log = fut.result()
            if not ok and home is not None:
                hv, nv = _cudart_header_version(home), nvcc_version(home)
                if hv and hv != nv and "incompatible" in log:
                    log += (
                        f"\nhint: nvcc {nv} but CUDA runtime headers {hv} in {home}/include: install the "
                        f"matching compiler, e.g. pip install 'nvidia-cuda-nvcc=={hv}.*' "
                        f"'nvidia-cuda-crt=={hv}.*' 'nvidia-nvvm=={hv}.*'"
                    )
            results.append(CheckResult(name, tool, ok, secs, log))
    if nvrtc:
        results.append(_check_nvrtc(src, archs[0]))
    shutil.rmtree(out_dir, ignore_errors=True)
    return results


def _find_libnvrtc() -> str | None:
    pats = []
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        pats += [
            f"{base}/nvidia/cu13/lib/libnvrtc.so*",
            f"{base}/nvidia/cuda_nvrtc/lib/libnvrtc.so*",
            f"{base}/nvidia/cu12/lib/libnvrtc.so*",
        ]
    home = find_cuda_home()
    if home is not None:
        pats += [f"{home}/lib64/libnvrtc.so*", f"{home}/lib/libnvrtc.so*"]
    for pat in pats:
        for f in sorted(glob.glob(pat)):
            if "builtins" not in f and "alt" not in Path(f).name:
                return f
    return None


def nvrtc_compile(
    src_dir: Path, arch: str, name_expressions: list[str] | None = None
) -> tuple[bool, str, dict]:
    """Compile csrc/kernels.cu with libnvrtc (ctypes; no GPU needed). Returns (ok, log, lowered names)."""
    lib_path = _find_libnvrtc()
    if lib_path is None:
        raise KernelBuildError("libnvrtc not found (pip install nvidia-cuda-nvrtc)")
    lib = ctypes.CDLL(lib_path)
    prog = ctypes.c_void_p()
    code = (src_dir / NVRTC_UNIT).read_bytes()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), code, NVRTC_UNIT.encode(), 0, None, None)
    if rc != 0:
        return False, f"nvrtcCreateProgram failed ({rc})", {}
    for ne in name_expressions or []:
        lib.nvrtcAddNameExpression(prog, ne.encode())
    # the options CuPy uses on a machine without a toolkit: no CUDA include directory, only NVRTC's builtins
    opts = [f"-arch={arch}", "-std=c++17", f"-I{src_dir}"]
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, buf)
    log = f"libnvrtc: {lib_path}\noptions: {' '.join(opts)}\n" + buf.value.decode(errors="replace")
    names = {}
    if rc == 0:
        for ne in name_expressions or []:
            p = ctypes.c_char_p()
            lib.nvrtcGetLoweredName(prog, ne.encode(), ctypes.byref(p))
            names[ne] = p.value.decode()
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc == 0, log.strip(), names


def _check_nvrtc(src: Path, arch: str) -> CheckResult:
    import time

    t0 = time.perf_counter()
    try:
        ok, log, _ = nvrtc_compile(src, arch)
    except (KernelBuildError, OSError) as e:
        return CheckResult(NVRTC_UNIT + " (kernels)", "nvrtc", None, 0.0, str(e))
    return CheckResult(NVRTC_UNIT + " (kernels)", f"nvrtc {arch}", ok, time.perf_counter() - t0, log)


def disassemble_mma(arch: str = "sm_90a") -> dict[str, dict[str, int]]:
    """Compile kernels.cu for `arch`, disassemble (cuobjdump -sass) and count tensor-core / async-copy
    instructions per kernel: {kernel: {"HMMA": n, "LDSM": n, "LDGSTS": n}}. Needs nvcc + cuobjdump."""
    home = find_cuda_home()
    if home is None or not (home / "bin" / "cuobjdump").is_file():
        raise KernelBuildError("cuobjdump not found: pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")
    src = source_dir()
    env = _cuda_env(home)
    with tempfile.TemporaryDirectory() as tmp:
        obj = os.path.join(tmp, "k.o")
        ok, _, log = _run(
            [
                str(home / "bin" / "nvcc"),
                "-std=c++17",
                gencode(arch),
                f"-I{src}",
                "-c",
                str(src / NVRTC_UNIT),
                "-o",
                obj,
            ],
            env,
        )
        if not ok:
            raise KernelBuildError(log)
        p = subprocess.run(
            [str(home / "bin" / "cuobjdump"), "-sass", obj], capture_output=True, text=True, env=env
        )
        if p.returncode != 0:
            raise KernelBuildError(p.stderr.strip())
    counts: dict[str, dict[str, int]] = {}
    fn = None
    for line in p.stdout.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            fn = m.group(1)
            counts[fn] = {"HMMA": 0, "LDSM": 0, "LDGSTS": 0}
        elif fn:
            for op in ("HMMA", "LDSM", "LDGSTS"):
                if re.search(rf"\b{op}\b|\b{op}\.", line):
                    counts[fn][op] += 1
    return counts

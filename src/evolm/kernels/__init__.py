"""evolm's own CPU kernels, compiled from C++ at first use (``torch.utils.cpp_extension``).

``qgemv.cpp``: the quantized matrix-vector products of CPU decoding. PyTorch's CPU kernels
dequantize the weights and multiply in floating point (``_weight_int4pack_mm_for_cpu``,
``_weight_int8pack_mm``), i.e. one float FMA per weight. llama.cpp instead quantizes the
activation vector too, to int8 in blocks of 32 with one scale each (its Q8 blocks), and takes
integer dot products: 32 multiply-adds per AVX512-VNNI ``vpdpbusd`` (or two AVX2 instructions).
Blocks of 32 keep SmolLM2's outlier features: one scale per tensor (FBGEMM's dynamic int8
linear) does not (docs/performance.md). The ops:

- ``torch.ops.evolm_q.q4a8_linear(x, qw, dm)``: 4-bit weights, ``w = q * d + m`` per group of 32
  with (d, m) in float16 (llama.cpp's Q4_1: 5 bits per weight), times int8 activations;
- ``torch.ops.evolm_q.q8a8_linear(x, qw, s)``: int8 weights with one scale per row.

Both take x (M, K) float and return (M, N) float32. ``torch.ops.evolm_q.q4_dequantize(qw, dm)``
gives the q4 layer's float32 (N, K) weight (prefill dequantizes, then multiplies).

``skinny_gemm.cpp``: float products of a few activation rows, the matmuls of decoding in fp32,
bf16 and weight-only int8. BLAS kernels are tuned for large M; at M = 1..16 MKL streams the
weights at a third of the memory bandwidth. ``torch.ops.evolm_f.skinny_linear(x, w, scale=None)``
(x (M, K), w (N, K) fp32, bf16, or int8 with a float32 scale per row) loads each weight vector
once into registers and multiplies it into every row (fp32 accumulation, result in x's dtype);
a row's result does not depend on the other rows. ``KernelPolicy.uses_skinny``
(evolm/quant/policy.py) says whether the compiled decode step and ``Int8Linear`` use it.

``decode_attention.cpp``: ``torch.ops.evolm_f.decode_attention(q, k, v, mask, scale, softcap)``,
one new token's attention over a KV cache (GQA, soft-cap, a boolean mask whose hidden slots
it skips), what the compiled CPU decode step calls per layer instead of inductor's loops.

:func:`available` builds the extension once
per machine (~30-60 s, cached under ``~/.cache/evolm/kernels``) with ``-march=native`` and says
whether it works; without a C++ compiler it returns False and callers keep PyTorch's kernels.
Whether quantized layers and the decode step use them is their ``KernelPolicy``'s choice
(``evolm/quant/policy.py``; ``EVOLM_KERNELS=1|0`` through ``KernelPolicy.from_env``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import time
import warnings
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name(n) for n in ("qgemv.cpp", "skinny_gemm.cpp", "decode_attention.cpp", "block_gemm.cpp",
                                                    "decode_block.cpp")]
_HEADERS = [Path(__file__).with_name("simd.h")]  # the SIMD vector widths the kernels share
_state: dict = {}


def source_files() -> list[Path]:
    """The C++ sources and headers the kernels are built from."""
    return _SOURCES + _HEADERS


def _build_dir() -> Path:
    """One build per (source, torch, CPU): ``-march=native`` code must not move to another CPU. And
    per source folder: the build records the sources' paths, so two checkouts of the same sources
    sharing one folder would each rebuild it (minutes) whenever the other had built last."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        pass
    key = hashlib.sha256(b"".join(p.read_bytes() for p in source_files()) + torch.__version__.encode() + platform.machine().encode()
                         + cpu.encode() + str(_SOURCES[0].parent.resolve()).encode()).hexdigest()[:12]
    from evolm.assets import cache_dir

    root = cache_dir() / "kernels" / key
    root.mkdir(parents=True, exist_ok=True)
    return root


def _fake_registrations() -> None:
    """Shapes for torch.compile: both ops map (M, K) activations to (M, N) float32."""

    @torch.library.register_fake("evolm_q::q4a8_linear")
    def _(x, qw, dm):
        return x.new_empty((x.shape[0], qw.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("evolm_q::q4_dequantize")
    def _(qw, dm):
        return qw.new_empty((qw.shape[0], qw.shape[1] * 2), dtype=torch.float32)

    @torch.library.register_fake("evolm_q::q8a8_linear")
    def _(x, qw, s):
        return x.new_empty((x.shape[0], qw.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("evolm_f::skinny_linear")
    def _(x, w, scale=None):
        return x.new_empty((x.shape[0], w.shape[0]))

    @torch.library.register_fake("evolm_f::blocks_linear")
    def _(x, codes, scale, min, group):
        return x.new_empty((x.shape[0], codes.shape[0]))

    @torch.library.register_fake("evolm_f::blocks_gemm")
    def _(x, codes, scale, min, group):
        return x.new_empty((x.shape[0], codes.shape[0]))

    @torch.library.register_fake("evolm_f::blocks_dense_linear")
    def _(x, codes, scale, min, group):
        return x.new_empty((x.shape[0], codes.shape[0]))

    @torch.library.register_fake("evolm_f::blocks_dequantize")
    def _(codes, scale, min, group, bf16=False):
        k = codes.shape[1] * (2 if codes.dtype == torch.uint8 else 1)
        return scale.new_empty((codes.shape[0], k), dtype=torch.bfloat16 if bf16 else torch.float32)

    @torch.library.register_fake("evolm_f::decode_attention")
    def _(q, k, v, mask, scale, softcap=None):
        return v.new_empty((q.shape[0], q.shape[1], 1, v.shape[3]))


def available() -> bool:
    """Build (once) and load the quantized-GEMV extension; False where it cannot be built."""
    if "ok" in _state:
        return _state["ok"]
    _state["ok"], _state["isa"] = False, None
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        root = _build_dir()
        mod = _load_built(root) or _build(root)
        _fake_registrations()
        _state["isa"], _state["skinny_isa"], _state["module"], _state["ok"] = mod.isa(), mod.skinny_isa(), mod, True
    except Exception as e:  # no compiler, no headers, ...: PyTorch's kernels remain
        warnings.warn(f"evolm: the quantized CPU kernels (evolm/kernels/qgemv.cpp) could not be built, "
                      f"using PyTorch's instead: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return _state["ok"]


_NAME = "evolm_qgemv"


STALE_LOCK_S = 3600  # no build takes this long; a lock older than this was left by a killed one


def _wait_for_builder(root: Path, poll_s: float = 1.0) -> None:
    """Wait while another process builds in ``root``; take over a lock a killed builder left.

    ``torch.utils.cpp_extension`` guards a build folder with a ``lock`` file and waits, forever, for
    it to go. A builder killed mid-build (SIGKILL, out of memory) never removes it, and every later
    start of evolm would hang. Each builder here first writes its process id to ``builder.pid``: a
    lock whose builder is no longer alive, or older than ``STALE_LOCK_S``, is removed (with a
    warning) and this process builds."""
    lock, owner = root / "lock", root / "builder.pid"
    while lock.exists():
        try:
            pid = int(owner.read_text())
        except (OSError, ValueError):
            pid = None
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return  # the builder finished meanwhile
        alive = pid is not None and _alive(pid)
        if (pid is not None and not alive) or age > STALE_LOCK_S:
            log.warning("evolm kernels: removing the lock of a build that did not finish (%s; process %s %s, "
                        "lock %.0f s old)", root, pid, "alive" if alive else "gone", age)
            lock.unlink(missing_ok=True)
            return
        time.sleep(poll_s)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _build(root: Path):
    """Compile the sources into ``root`` (or reuse its objects: ninja rebuilds what changed) and import
    the module; then mark the build complete, so that later starts import it directly."""
    from torch.utils.cpp_extension import load

    _wait_for_builder(root)
    mod = _load_built(root)  # the builder we waited for finished it
    if mod is not None:
        return mod
    (root / "builder.pid").write_text(str(os.getpid()))
    flags = ["-O3", "-march=native", "-fopenmp"] if os.name != "nt" else ["/O2"]
    mod = load(name=_NAME, sources=[str(p) for p in _SOURCES], extra_cflags=flags, build_directory=str(root),
               verbose=False)
    (root / f"{_NAME}.complete").touch()
    return mod


def _load_built(root: Path):
    """The module a finished build left in ``root``, imported without ``torch.utils.cpp_extension``.

    The folder is keyed by the sources, torch and the CPU (:func:`_build_dir`), so a completed build
    there is current; importing it directly skips cpp_extension's own import (setuptools, ~0.1 s)
    and its ninja check, which every start of ``evolm generate`` paid. None: build it."""
    import importlib.machinery
    import importlib.util

    so = root / f"{_NAME}.so"
    if not (root / f"{_NAME}.complete").is_file() or not so.is_file():
        return None
    try:
        spec = importlib.util.spec_from_file_location(_NAME, so,
                                                      loader=importlib.machinery.ExtensionFileLoader(_NAME, str(so)))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    except ImportError:
        return None


def block_plan_class():
    """The C++ ``BlockPlan`` class of ``decode_block.cpp`` (one block's fused decode step), or None
    where the kernels cannot be built."""
    return _state["module"].BlockPlan if available() else None


def cpu_has_avx512() -> bool:
    """Whether PyTorch's CPU kernels run their AVX-512 code here: the measured kernel choices of
    decoding differ between AVX-512 and AVX2-only CPUs (docs/performance.md)."""
    return "AVX512" in torch.backends.cpu.get_cpu_capability()


SKINNY_ROWS = 16  # products of at most this many rows go to skinny_linear (measured faster than MKL)


def isa() -> str | None:
    """Which code path the built extension runs: 'avx512vnni', 'avx2' or 'scalar' (None: not built)."""
    available()
    return _state.get("isa")


def skinny_isa() -> str | None:
    """The float kernel's code path: 'avx512bf16' (bf16 x bf16 products in vdpbf16ps pairs),
    'avx512', 'avx2' or 'scalar' (None: not built)."""
    available()
    return _state.get("skinny_isa")


def pack_q4(q: torch.Tensor) -> torch.Tensor:
    """4-bit codes (N, K) in 0..15 -> (N, K/2) uint8, in the kernel's layout: within each group of
    32, byte j holds code j in its low nibble and code j + 16 in its high nibble (llama.cpp's)."""
    N, K = q.shape
    g = q.to(torch.uint8).reshape(N, K // 32, 2, 16)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(N, K // 2).contiguous()


def pack_q4_scales(d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Scales and minima (N, K/32) -> the kernels' (N, K/32, 2) float16 (d, m) pairs."""
    return torch.stack((d, m), -1).to(torch.float16).contiguous()


def unpack_q4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_q4`: (N, K/2) uint8 -> (N, K) codes as uint8."""
    N = packed.shape[0]
    b = packed.reshape(N, -1, 16)
    return torch.stack((b & 0x0F, b >> 4), 2).reshape(N, -1)

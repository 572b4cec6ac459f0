"""Optional native kernels, built at run time with the system C compiler (no build step at install).

All for batch-1 decoding on AVX-512 CPUs (`cpu_gemv.c`): matrix-vector products, in bf16 the
three fused calls of a Qwen2 decoder layer's step (`decode_layer`), and in bf16 and fp32 a whole
model's step with its KV cache in one call (`decode_model`). PyTorch's M=1 paths
(MKL sgemv, oneDNN bf16 gemm) read the weights at about half of what this CPU's memory
delivers; decoding is nothing but that read, so a plain streaming kernel is worth ~1.5-2x
tokens/s. Everything here degrades gracefully: not Linux, no compiler, no AVX-512, or
FASTVLM_NO_KERNELS=1 means `available()` is False and callers keep using PyTorch.

The library is cached under $FASTVLM_KERNEL_CACHE (default ~/.cache/fastvlm/kernels),
keyed by the source, the compiler flags and the CPU's feature flags.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCE = os.path.join(_HERE, "cpu_gemv.c")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
_lock = threading.Lock()
_state: dict = {}


def cpuinfo_field(name: str, path: str = "/proc/cpuinfo") -> str:
    """The value of the first `name : value` line of /proc/cpuinfo ("" where there is none, or no such file)."""
    try:
        with open(path) as f:
            for line in f:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> set[str]:
    """The CPU's feature flags, from /proc/cpuinfo (empty where there is none)."""
    return set(cpuinfo_field("flags").split())


def default_prefetch_bytes() -> int:
    """How far ahead the bf16 kernel prefetches its weight stream on this CPU (0: not at all).

    On the 2-core AMD EPYC (Zen 4) software prefetch lowered the kernel's read rate on one 545 MB
    matrix (30.8-36.9 against 32.5-41.2 GB/s without; benchmarks/results/gemv-variants-cpu.log).
    On the 2-core Intel Xeon with AMX it raised it: 26.3 GB/s at 1 KB ahead against 21.1 without on
    that matrix (gemv-variants-cpu-prefetch-intel.log), and a 0.5B bf16 decode step took 44.2 ms at
    1 KB, 52.6 ms without and 56.5 ms at 4 KB, interleaved in one run with the order rotated every
    round (decode-step-cpu-bf16-prefetch-intel.json; both from `bash benchmarks/run_cpu.sh prefetch`).
    So Intel CPUs get 1 KB and others none.
    FASTVLM_GEMV_PREFETCH=BYTES overrides (0 turns it off).
    """
    env = os.environ.get("FASTVLM_GEMV_PREFETCH", "").strip()
    if env:
        try:
            return max(0, int(env))
        except ValueError:
            raise ValueError(f"FASTVLM_GEMV_PREFETCH must be a whole number of bytes, got {env!r}") from None
    return 1024 if cpuinfo_field("vendor_id") == "GenuineIntel" else 0


def _compiler() -> Optional[str]:
    cc = os.environ.get("CC")
    if cc and shutil.which(cc):
        return shutil.which(cc)
    for name in ("gcc", "cc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _build(cc: str, flags: set[str]) -> str:
    with open(_SOURCE, "rb") as f:
        src = f.read()
    key = hashlib.sha256(src + " ".join(_FLAGS + ["-lm"]).encode() + " ".join(sorted(flags)).encode() + cc.encode()).hexdigest()[:16]
    cache = os.environ.get("FASTVLM_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastvlm", "kernels")
    os.makedirs(cache, exist_ok=True)
    lib = os.path.join(cache, f"libfastvlm_cpu_{key}.so")
    if not os.path.exists(lib):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            subprocess.run([cc, *_FLAGS, _SOURCE, "-o", tmp, "-lm"], check=True, capture_output=True, timeout=120)
            os.replace(tmp, lib)  # atomic: concurrent builders never see a half-written file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return lib


def load() -> Optional[ctypes.CDLL]:
    """The compiled library, building it on first use; None where it cannot be had (see `status()`)."""
    if "lib" in _state:  # every decode step's linear layers come here: no lock once loaded
        return _state["lib"]
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        lib, why = None, ""
        flags = cpu_flags()
        cc = _compiler()
        if os.environ.get("FASTVLM_NO_KERNELS", "") not in ("", "0"):
            why = "disabled by FASTVLM_NO_KERNELS"
        elif sys.platform != "linux" or "avx512f" not in flags:
            why = "needs Linux on an x86-64 CPU with AVX-512"
        elif cc is None:
            why = "no C compiler (gcc, cc or clang) on PATH"
        else:
            try:
                lib = ctypes.CDLL(_build(cc, flags))
                for name, ptr in (("fastvlm_gemv_f32", ctypes.c_void_p),):
                    getattr(lib, name).argtypes = [ptr] * 4 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
                lib.fastvlm_gemv_f32.restype = None
                P, L, F, N = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
                lib.fastvlm_qwen2_step.argtypes = [N, P, P, P] + [L] * 6 + [P, P, F, P, P, L, L, P, F, P, L] + [P, P, P, N]
                lib.fastvlm_qwen2_step.restype = ctypes.c_int
                lib.fastvlm_set_prefetch.argtypes = [ctypes.c_int64]
                lib.fastvlm_set_prefetch.restype = None
                lib.fastvlm_get_prefetch.restype = ctypes.c_int64
                lib.fastvlm_set_prefetch(default_prefetch_bytes())
                if lib.fastvlm_has_bf16():
                    for name, args in (
                            ("fastvlm_gemv_bf16", [P] * 4 + [L, L, N]),
                            ("fastvlm_qwen2_attn_in_bf16", [P, P, F] + [P] * 8 + [L] * 4 + [P, P, N]),
                            ("fastvlm_qwen2_attn_out_bf16", [P, P, P, L, P, F, L, P, P, N]),
                            ("fastvlm_qwen2_mlp_bf16", [P] * 5 + [L, L, P, P, N])):
                        getattr(lib, name).argtypes = args
                        getattr(lib, name).restype = None
            except (OSError, subprocess.SubprocessError, AttributeError) as e:
                lib, why = None, f"build failed: {getattr(e, 'stderr', b'') or e}"
        _state["lib"], _state["why"] = lib, why
        return lib


def status() -> str:
    """One line: which native kernels are in use, or why none are."""
    lib = load()
    if lib is None:
        return f"native decode kernels off ({_state.get('why', '')})"
    pf = lib.fastvlm_get_prefetch()
    return ("native decode kernels on (fp32" + (", bf16" if lib.fastvlm_has_bf16() else "") + ")"
            + (f", prefetching {pf} bytes ahead" if pf else ""))


def set_prefetch(nbytes: int) -> None:
    """Set how far ahead (bytes) the bf16 kernels prefetch their weight stream; 0 turns it off."""
    lib = load()
    if lib is not None:
        lib.fastvlm_set_prefetch(int(nbytes))


def prefetch_bytes() -> int:
    lib = load()
    return int(lib.fastvlm_get_prefetch()) if lib is not None else 0


def available(dtype: torch.dtype = torch.bfloat16) -> bool:
    lib = load()
    if lib is None:
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and bool(lib.fastvlm_has_bf16())


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for a single row of x (any leading shape with one element), on the CPU kernel."""
    lib = load()
    O, I = weight.shape
    x = x.contiguous()
    y = torch.empty(x.shape[:-1] + (O,), dtype=x.dtype, device=x.device)
    fn = lib.fastvlm_gemv_bf16 if x.dtype == torch.bfloat16 else lib.fastvlm_gemv_f32
    fn(weight.data_ptr(), x.data_ptr(), bias.data_ptr() if bias is not None else None, y.data_ptr(),
       O, I, torch.get_num_threads())
    return y


class DecodeLinear(nn.Linear):
    """nn.Linear that runs single-row CPU inputs (batch-1 decoding) on the native kernel.

    Same parameters and state dict as nn.Linear; every other input, autograd included,
    takes F.linear. Installed by `use_decode_kernels`, which swaps the class in place.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (x.device.type == "cpu" and x.numel() == x.shape[-1] and x.dtype == w.dtype
                and w.dtype in (torch.bfloat16, torch.float32) and w.is_contiguous()
                and (self.bias is None or (self.bias.dtype == w.dtype and self.bias.is_contiguous()))
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
                and available(w.dtype)):
            return gemv(x, w, self.bias)
        return F.linear(x, w, self.bias)


def use_decode_kernels(module: nn.Module, enabled: bool = True) -> int:
    """Swap every plain nn.Linear under `module` to DecodeLinear (or back), and its Qwen2 decoder
    layers to the native bf16 decode step (`decode_layer.use_lean_decode_layers`) where the bf16
    kernels exist; returns how many DecodeLinears remain."""
    from .decode_layer import use_lean_decode_layers

    n = 0
    for m in module.modules():
        if enabled and type(m) is nn.Linear:
            m.__class__ = DecodeLinear
        elif not enabled and type(m) is DecodeLinear:
            m.__class__ = nn.Linear
        n += type(m) is DecodeLinear
    use_lean_decode_layers(module, enabled)
    return n


def tune_allocator(mmap_threshold: int = 1 << 30) -> bool:
    """Make glibc serve big allocations from the heap and keep freed memory (process-wide; Linux only).

    By default glibc gives every allocation above a few MB its own fresh mmap and unmaps
    it on free, so each forward pass page-faults its activation buffers in again (the
    kernel zero-fills every page). Raising the mmap and trim thresholds lets a forward
    reuse the previous one's memory. FastViTHD at 1024 px on the 2-core Zen 4
    (benchmarks/results/profile-cpu*.json, `bash benchmarks/run_cpu.sh profile`): fp32 NCHW
    5.05 -> 3.17 s, fp32 fused 2.85 -> 2.72 s, bf16 fused 1.56 -> 1.55 s. The cost: RSS stays at
    its high-water mark instead of shrinking between requests. Called by `fastvlm generate`,
    `chat`, `eval`, `serve` and `train`, by `fastvlm bench` unless --default-allocator, and by
    scripts/pretrain_synth_encoder.py; library users opt in. Returns whether the settings were applied.
    """
    if sys.platform != "linux" or os.environ.get("FASTVLM_NO_MALLOPT", "") not in ("", "0"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
        ok = libc.mallopt(m_mmap_threshold, int(mmap_threshold)) == 1
        return bool(ok and libc.mallopt(m_trim_threshold, int(2 * mmap_threshold)) == 1)
    except (OSError, AttributeError):
        return False

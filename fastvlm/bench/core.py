"""Measurement primitives for `fastvlm bench`: timers, memory, machine facts, roofline peaks, FLOP counts."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import threading
import time
from typing import Any, Callable, Optional

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def summarize(values: list[float]) -> dict[str, Any]:
    """Median (the headline), min, mean and every sample, in seconds."""
    if not values:
        return {"median": None, "min": None, "mean": None, "n": 0, "samples": []}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "mean": statistics.fmean(values),
        "n": len(values),
        "samples": [round(v, 6) for v in values],
    }


def time_call(fn: Callable[[], Any], device: torch.device, warmup: int = 1, repeats: int = 5) -> dict[str, Any]:
    """Summary of `repeats` timed calls of fn after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    values = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        values.append(time.perf_counter() - t0)
    return summarize(values)


# ---------------------------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover - psutil is a bench dependency
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where that cannot be done (not Linux,
    or a sandbox that takes the write without resetting the mark: the mark must then be near the current RSS)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    peak = _rss_peak_bytes()
    return peak is not None and peak <= rss_bytes() * 1.05 + (16 << 20)


def _rss_peak_bytes() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class PeakMemory:
    """Peak memory during a block: CUDA's max_memory_allocated; on Linux CPUs the kernel's peak-RSS mark
    (VmHWM, reset at entry), which costs nothing while the block runs; on MPS the memory Metal holds for
    tensors, sampled every few ms; elsewhere RSS sampled every few ms.

    `peak` is the process's peak (every model loaded counts), `delta` the rise over the
    level at entry (what the measured call itself needed: activations, caches, workspaces).
    The sampler (not Linux) runs a thread beside the timed call; it slowed a tiny model's decode by about
    a third in an A/B run here, so on such systems time and memory should come from separate calls.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.002) -> None:
        self.device = device
        self.interval_s = interval_s
        self.peak = 0
        self.start = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._kernel_peak = False

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        # MPS tensors live in Metal buffers, which the process's RSS does not show: sample what Metal holds
        self._read = torch.mps.current_allocated_memory if self.device.type == "mps" else rss_bytes
        self.start = self.peak = self._read()
        self._kernel_peak = self.device.type == "cpu" and _reset_rss_peak()
        if self._kernel_peak:
            return self

        def poll():
            while not self._stop.wait(self.interval_s):
                self.peak = max(self.peak, self._read())

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        if self._kernel_peak:
            self.peak = max(self.peak, _rss_peak_bytes() or 0, rss_bytes())
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self._read())

    @property
    def delta(self) -> int:
        return max(self.peak - self.start, 0)


# ---------------------------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    from ..kernels import cpuinfo_field

    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    from ..kernels import cpu_flags

    flags = cpu_flags()
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_int8")
    return [w for w in wanted if w in flags]


def load_average() -> Optional[list[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def wait_for_quiet(max_wait_s: float, busy_below: float = 15.0, sample_s: float = 0.5) -> dict[str, float]:
    """Wait (at most max_wait_s) until the machine's CPUs are idle, i.e. other processes use < busy_below %.

    On a shared machine, a 2-thread PyTorch run whose cores are also busy with someone
    else's work can slow down 10x: every parallel region waits for its descheduled
    thread. Measuring in quiet moments gives numbers that describe the code, not the
    neighbours. Called between runs, when this process is idle, so all load is others'.
    Returns the seconds waited and the last busy percentage seen.
    """
    if max_wait_s <= 0:
        return {"waited_s": 0.0, "busy_percent": None}
    try:
        import psutil
    except ImportError:  # pragma: no cover
        return {"waited_s": 0.0, "busy_percent": None}
    t0 = time.perf_counter()
    busy = psutil.cpu_percent(interval=sample_s)
    while busy >= busy_below and time.perf_counter() - t0 < max_wait_s:
        busy = psutil.cpu_percent(interval=sample_s)
    return {"waited_s": time.perf_counter() - t0, "busy_percent": busy}


@contextlib.contextmanager
def strict_fp32(device: torch.device):
    """On CUDA, TF32 off for convolutions (cuDNN's default is on) and matmuls while the block runs, so that
    "fp32" rows, the fp32 matmul peak and the fp32 exact accuracy reference are fp32; restored afterwards."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def source_commit() -> Optional[str]:
    """The git commit the package runs from, with "-dirty" when its files differ from it; None outside a checkout."""
    import subprocess

    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    here = os.path.dirname(package)  # the checkout's root, when the package runs from one
    try:
        def git(*args):
            return subprocess.run(["git", "-C", here, *args], capture_output=True, text=True, timeout=10)

        top = git("rev-parse", "--show-toplevel")
        # an installed copy inside some other repository (a venv in a project) is not that project's commit
        if top.returncode != 0 or os.path.realpath(top.stdout.strip()) != os.path.realpath(here):
            return None
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", package).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    import transformers

    from .. import __version__, kernels

    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default: active)"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "fastvlm": __version__,
        "fastvlm_commit": source_commit(),
        "device": str(device),
        "load_average_start": load_average(),
    }
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_total_gb"] = round(psutil.virtual_memory().total / 1e9, 1)
    except ImportError:  # pragma: no cover
        pass
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["tf32"] = {"cudnn_conv": torch.backends.cudnn.allow_tf32,
                        "matmul": torch.backends.cuda.matmul.allow_tf32}
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 1e9, 1)
        info["cuda"] = torch.version.cuda
    if device.type == "cpu":
        info["onednn"] = torch.backends.mkldnn.is_available()
        info["native_kernels"] = kernels.status()
    return info


# ---------------------------------------------------------------------------------------------- roofline


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> dict[str, Any]:
    """GFLOP/s of an n x n x n matrix product (the machine's practical compute peak for this dtype)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    with torch.inference_mode():
        t = time_call(lambda: a @ b, device, warmup=2, repeats=repeats)
    flops = 2 * n**3
    return {"n": n, "gflops_median": flops / t["median"] / 1e9, "gflops_best": flops / t["min"] / 1e9,
            "seconds": t}


def read_bandwidth(device: torch.device, mbytes: int = 1024, repeats: int = 10) -> dict[str, Any]:
    """GB/s of reading a large buffer once: the bound for weight-streaming decode.

    Two readers, and the faster one sets the bound: torch's sum over an fp32 buffer, and
    on CPUs with the native kernels a bf16 matrix-vector product over the same bytes
    (a pure forward stream; it reads faster than torch's reduction on some CPUs).
    """
    numel = mbytes * 2**20 // 4
    x = torch.ones(numel, device=device, dtype=torch.float32)
    nbytes = numel * 4
    with torch.inference_mode():
        t = time_call(lambda: x.sum(), device, warmup=2, repeats=repeats)
    del x
    out: dict[str, Any] = {"mbytes": mbytes, "sum": {"gbps_median": nbytes / t["median"] / 1e9,
                                                      "gbps_best": nbytes / t["min"] / 1e9, "seconds": t}}
    if device.type == "cpu":
        from .. import kernels

        if kernels.available(torch.bfloat16):
            cols = 4096
            w = torch.zeros(nbytes // 2 // cols, cols, dtype=torch.bfloat16)
            v = torch.ones(1, cols, dtype=torch.bfloat16)
            with torch.inference_mode():
                t2 = time_call(lambda: kernels.gemv(v, w), device, warmup=2, repeats=repeats)
            del w
            out["native_gemv"] = {"gbps_median": nbytes / t2["median"] / 1e9, "gbps_best": nbytes / t2["min"] / 1e9,
                                  "seconds": t2}
    out["gbps_median"] = max(out[k]["gbps_median"] for k in ("sum", "native_gemv") if k in out)
    out["gbps_best"] = max(out[k]["gbps_best"] for k in ("sum", "native_gemv") if k in out)
    return out


# ---------------------------------------------------------------------------------------------- FLOPs


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs (2 x multiply-adds of matmuls, convolutions and attention) of fn, counted by torch's FlopCounterMode.

    Run it on meta tensors: shapes propagate, nothing is computed.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return int(counter.get_total_flops())


def encoder_flops(vision_config, height: int, width: Optional[int] = None) -> int:
    from ..vision import FastViTHD

    width = height if width is None else width
    with torch.device("meta"):
        enc = FastViTHD(vision_config, attn_impl="eager").eval()
    return count_flops(lambda: enc(torch.empty(1, 3, height, width, device="meta")))


def lm_prefill_flops(text_config, tokens: int) -> int:
    """LLM prefill over `tokens` positions with logits for the last one only (as generation does)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(text_config).eval()
    hidden = text_config.hidden_size
    return count_flops(lambda: lm(inputs_embeds=torch.empty(1, tokens, hidden, device="meta"), logits_to_keep=1))


def module_flops(module_factory: Callable[[], torch.nn.Module], *shape: int) -> int:
    with torch.device("meta"):
        m = module_factory().eval()
    return count_flops(lambda: m(torch.empty(*shape, device="meta")))


def lm_decode_bytes(language_model, context: int) -> int:
    """Bytes one decode step must read: every weight but the embedding table, plus the KV cache."""
    emb = language_model.get_input_embeddings().weight
    seen = {id(emb)} if not getattr(language_model.config, "tie_word_embeddings", False) else set()
    total = 0
    for p in language_model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    # quantized linears keep their int8 weights outside parameters()
    for m in language_model.modules():
        packed = getattr(m, "_packed_params", None)
        if packed is not None:
            try:
                w, b = packed._weight_bias()
                total += w.numel() * 1 + (0 if b is None else b.numel() * b.element_size())
            except Exception:  # pragma: no cover - layout of torch's packed params varies
                pass
    cfg = language_model.config
    kv_heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    act_bytes = 2 if emb.dtype in (torch.bfloat16, torch.float16) else 4
    total += 2 * cfg.num_hidden_layers * kv_heads * head_dim * context * act_bytes
    return total

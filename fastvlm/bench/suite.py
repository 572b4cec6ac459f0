"""The benchmark itself: our inference modes, transformers' FastVLM port and the paper's encoders, in one run.

Timings are interleaved: each round runs every variant once (ours in each mode, then
transformers'), so a burst of load from elsewhere hits all of them alike, and the
ours/theirs ratios are the medians of per-round ratios. Baseline encoders are paired the
same way with a run of our fast mode at the resolution the paper compares them with.
"""

from __future__ import annotations

import copy
import gc
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import core

IMAGE_TOKEN = -200  # fastvlm.config.IMAGE_TOKEN_INDEX
TEXT_TOKENS = 32  # text around the image in the prompt: 288 tokens at 1024 px, as in targets.md
OUR_MODES = ("exact", "fast", "compile", "int8", "no-graphs", "graph-decode")
# modes that run on one kind of device only: (device type, why); build_variants leaves them out elsewhere
DEVICE_ONLY_MODES = {"int8": ("cpu", "its dynamic int8 kernels are CPU-only"),
                     "no-graphs": ("cuda", "fast uses CUDA graphs only on CUDA GPUs"),
                     "graph-decode": ("cuda", "CUDA graphs need a CUDA GPU")}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prompt_ids(image_tokens: int, text_tokens: int = TEXT_TOKENS, vocab: int = 1000, seed: int = 0) -> torch.Tensor:
    from ..config import IMAGE_TOKEN_INDEX

    g = torch.Generator().manual_seed(seed)
    vocab = max(vocab, 8)
    before = text_tokens // 3
    return torch.cat([
        torch.randint(3, vocab, (before,), generator=g),
        torch.full((image_tokens,), IMAGE_TOKEN_INDEX),
        torch.randint(3, vocab, (text_tokens - before,), generator=g),
    ]).unsqueeze(0)


def image(resolution: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed))


def _median(values: list[float]) -> Optional[float]:
    import statistics

    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ---------------------------------------------------------------------------------------------- our variants


def _view(model, **replace):
    """A FastVLM sharing every sub-module with `model` except those in `replace`."""
    v = copy.copy(model)
    v._modules = dict(model._modules)
    v._parameters = dict(model._parameters)
    v._buffers = dict(model._buffers)
    v.inference_settings = dict(model.inference_settings)
    for name, module in replace.items():
        setattr(v, name, module)
    return v


@dataclass
class Variant:
    """One way of running our model; variants share whatever they can (the LLM, usually)."""

    name: str
    model: Any
    decode_kernels: bool = False

    def activate(self) -> None:
        from .. import kernels
        from ..graphs import GRAPH_DECODE_FLAG

        # the LLM may be shared with other variants: put its linears and decode loop in this variant's form
        kernels.use_decode_kernels(self.model.language_model, self.decode_kernels)
        setattr(self.model.language_model, GRAPH_DECODE_FLAG, bool(self.model.inference_settings.get("graph_decode")))

    def run(self, ids: torch.Tensor, px: torch.Tensor, new_tokens: int) -> dict[str, Any]:
        from ..generation import generate

        self.activate()
        device = self.model.device
        with core.PeakMemory(device) as mem, torch.inference_mode():
            out = generate(self.model, ids, pixel_values=px, max_new_tokens=new_tokens, eos_token_id=[])
        t = out.timings
        projector = self.projector_time(int((ids == IMAGE_TOKEN).sum()))
        return {
            "encode_s": max(t.encode_s - projector, 0.0),
            "projector_s": projector,
            "prefill_s": t.prefill_s,
            "ttft_s": t.ttft_s,
            "decode_tokens_per_s": t.decode_tokens_per_s if new_tokens > 1 else None,
            "peak_mb": mem.peak / 2**20,
            "peak_delta_mb": mem.delta / 2**20,
            "tokens": out.sequences[0].tolist(),
        }

    def projector_time(self, tokens: int) -> float:
        """The projector's share of generate's encode time, timed once per token count (it is tiny)."""
        cache = self.__dict__.setdefault("_projector_s", {})
        if tokens not in cache:
            proj = self.model.mm_projector
            p = next(proj.parameters(), None)
            device = self.model.device
            feats = torch.randn(1, tokens, self.model.config.vision.out_channels, device=device,
                                dtype=p.dtype if p is not None else torch.float32)
            with torch.inference_mode():
                # the fastest of 5: a busy machine once timed this tiny MLP above a whole (tiny-model)
                # encode, leaving the encoder no time at all
                cache[tokens] = core.time_call(lambda: proj(feats), device, warmup=1, repeats=5)["min"]
        return cache[tokens]


def build_variants(base, modes: list[str]) -> dict[str, Variant]:
    """Our model in each requested mode; `base` (exact form) becomes the exact variant. Modes of
    `DEVICE_ONLY_MODES` are left out on other devices (the runner notes them)."""
    from .. import kernels

    device = base.device
    variants: dict[str, Variant] = {}
    fast_tower = None
    if "exact" in modes:
        base.optimize_for_inference("exact")
        variants["exact"] = Variant("exact", base, decode_kernels=False)
    if any(m in modes for m in ("fast", "compile", "int8", "no-graphs", "graph-decode")):
        fast_tower = copy.deepcopy(base.vision_tower)
        fast = _view(base, vision_tower=fast_tower)
        fast.optimize_for_inference("fast")
        dk = bool(fast.inference_settings.get("decode_kernels"))
        kernels.use_decode_kernels(base.language_model, False)
        if "fast" in modes:
            variants["fast"] = Variant("fast", fast, decode_kernels=dk)

        def fast_with(name: str, own_tower: bool, **options) -> None:
            """The fast mode with other options, on its own encoder copy or the fast one."""
            tower = copy.deepcopy(base.vision_tower) if own_tower else fast_tower
            v = _view(base, vision_tower=tower)
            v.optimize_for_inference("fast", **options)
            kernels.use_decode_kernels(base.language_model, False)  # the shared LLM's form is set per run
            variants[name] = Variant(name, v, decode_kernels=dk)

        def runs_here(mode: str) -> bool:
            only = DEVICE_ONLY_MODES.get(mode)
            return mode in modes and (only is None or only[0] == device.type)

        if runs_here("compile"):
            fast_with("compile", True, compile=True)
        if runs_here("no-graphs"):
            fast_with("no-graphs", True, cuda_graphs=False)
        if runs_here("graph-decode"):
            fast_with("graph-decode", False, graph_decode=True)
        if runs_here("int8"):
            lm = copy.deepcopy(base.language_model)
            kernels.use_decode_kernels(lm, False)
            q = _view(base, vision_tower=fast_tower, language_model=lm)
            q.optimize_for_inference("fast", quantize="int8")
            variants["int8"] = Variant("int8", q, decode_kernels=False)
    return variants


# ---------------------------------------------------------------------------------------------- transformers


def hf_compatible(config) -> bool:
    """Whether transformers' FastVLM port can hold this model (its encoder is always timm's fastvit_mci3)."""
    import dataclasses

    from ..config import VisionConfig

    v = config.vision
    reference = VisionConfig(image_size=v.image_size, inference_mode=v.inference_mode, projection_dim=v.projection_dim)
    return dataclasses.replace(v) == reference and config.text.get("model_type") == "qwen2"


class _FirstTokenStreamer:
    """Records when generate() emits each new token (its first put() is the prompt)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        core.sync(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class TransformersVariant:
    """transformers' FastVlmForConditionalGeneration on the same weights (saved in its layout, loaded back)."""

    name = "transformers"

    def __init__(self, model, image_token_id: int, pad_token_id: int) -> None:
        self.model = model
        self.image_token_id = image_token_id
        self.pad_token_id = pad_token_id

    @classmethod
    def from_ours(cls, ours, dtype: torch.dtype, workdir: str) -> "TransformersVariant":
        import transformers

        if not hasattr(transformers, "FastVlmForConditionalGeneration"):
            raise RuntimeError(f"transformers {transformers.__version__} has no FastVlmForConditionalGeneration")
        if not hf_compatible(ours.config):
            raise RuntimeError("transformers' port builds only the full FastViTHD (timm fastvit_mci3); "
                               "this model's encoder is another size")
        path = os.path.join(workdir, "hf")
        if not os.path.isdir(path):
            ours.save_pretrained(path, layout="hf")
        return cls.load(path, dtype, ours.device)

    @classmethod
    def load(cls, path: str, dtype: torch.dtype, device) -> "TransformersVariant":
        import transformers

        model = transformers.FastVlmForConditionalGeneration.from_pretrained(path, dtype=dtype)
        model = model.to(device).eval()
        pad = model.config.text_config.pad_token_id
        return cls(model, int(model.config.image_token_id), 0 if pad is None else int(pad))

    def run(self, ids: torch.Tensor, px: torch.Tensor, new_tokens: int) -> dict[str, Any]:
        from ..config import IMAGE_TOKEN_INDEX

        device = self.model.device
        dtype = self.model.dtype
        hf_ids = ids.masked_fill(ids == IMAGE_TOKEN_INDEX, self.image_token_id).to(device)
        pixel_values = px.to(device=device, dtype=dtype)
        streamer = _FirstTokenStreamer(device)
        marks: dict[str, float] = {}

        def stamp(key):
            def hook(*_):
                core.sync(device)
                marks.setdefault(key, time.perf_counter())
            return hook

        inner = self.model.model
        handles = [inner.vision_tower.register_forward_pre_hook(stamp("encode_start")),
                   inner.multi_modal_projector.register_forward_hook(stamp("encode_end"))]
        try:
            with core.PeakMemory(device) as mem, torch.inference_mode():
                core.sync(device)
                t0 = time.perf_counter()
                out = self.model.generate(input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids),
                                          pixel_values=pixel_values, max_new_tokens=new_tokens,
                                          min_new_tokens=new_tokens, do_sample=False, streamer=streamer,
                                          pad_token_id=self.pad_token_id)
                core.sync(device)
                t_end = time.perf_counter()
        finally:
            for h in handles:
                h.remove()
        first = streamer.times[0]
        enc = marks["encode_end"] - marks["encode_start"]
        decode = (new_tokens - 1) / (t_end - first) if new_tokens > 1 else None
        return {
            "encode_s": enc,  # vision tower + projector, inside generate()
            "prefill_s": first - marks["encode_end"],
            "ttft_s": first - t0,
            "decode_tokens_per_s": decode,
            "peak_mb": mem.peak / 2**20,
            "peak_delta_mb": mem.delta / 2**20,
            "tokens": out[0, hf_ids.shape[1]:].tolist(),
        }


# ---------------------------------------------------------------------------------------------- rounds


@dataclass
class Samples:
    values: dict[str, list] = field(default_factory=dict)

    def add(self, result: dict[str, Any]) -> None:
        for k, v in result.items():
            if k not in ("tokens", "before_run"):  # before_run: paired per run by the runner, not summarised
                self.values.setdefault(k, []).append(v)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, vs in self.values.items():
            vs = [v for v in vs if v is not None]
            if not vs:
                out[k] = None
            elif k in ("quiet_wait_s", "busy_before_percent"):
                out[k] = {"max": max(vs), "mean": sum(vs) / len(vs)}
            elif k.endswith("_s"):
                out[k] = core.summarize(vs)
            elif k.startswith("peak"):
                out[k] = max(vs)
            else:
                out[k] = core.summarize(vs)
        return out


QUIET = {"max_wait_s": 0.0, "busy_below": 15.0}  # set by the CLI (--quiet-wait); see core.wait_for_quiet


def interleaved(runners: dict[str, Callable[[], dict[str, Any]]], warmup: int, repeats: int,
                log_fn=log, label: str = "", before_run: Optional[Callable[[], Any]] = None,
                ) -> tuple[dict[str, Samples], list[dict[str, dict[str, Any]]]]:
    """Run every runner once per round; rounds after `warmup` are recorded.

    With QUIET["max_wait_s"] > 0, each timed run starts only once the machine is idle
    (or that many seconds have passed); the wait and the CPU use seen are recorded.
    `before_run`, when given, runs right before every timed run (after the quiet wait) and its
    result is kept in that run's result under "before_run" (the runner reads the memory
    bandwidth there, next to the decode it bounds).
    """
    samples = {k: Samples() for k in runners}
    rounds: list[dict[str, dict[str, Any]]] = []
    for r in range(warmup + repeats):
        this: dict[str, dict[str, Any]] = {}
        for name, fn in runners.items():
            quiet = core.wait_for_quiet(QUIET["max_wait_s"], QUIET["busy_below"]) if r >= warmup else {}
            before = before_run() if before_run is not None and r >= warmup else None
            res = fn()
            if before is not None:
                res["before_run"] = before
            if quiet:
                res["quiet_wait_s"] = quiet["waited_s"]
                res["busy_before_percent"] = quiet["busy_percent"]
            this[name] = res
            if r >= warmup:
                samples[name].add(res)
        tag = "warm-up" if r < warmup else f"round {r - warmup + 1}/{repeats}"
        log_fn(f"{label} {tag}: " + ", ".join(f"{k} TTFT {v['ttft_s'] * 1000:.0f} ms" for k, v in this.items()))
        if r >= warmup:
            rounds.append(this)
        gc.collect()
    return samples, rounds


def ratio_of_medians_per_round(rounds: list[dict[str, dict[str, Any]]], num: str, den: str,
                               key: str = "ttft_s") -> Optional[float]:
    ratios = [r[num][key] / r[den][key] for r in rounds if num in r and den in r and r[den][key]]
    return _median(ratios)


# ---------------------------------------------------------------------------------------------- accuracy


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest per-sample cosine similarity (no epsilon: tiny activations still compare by direction)."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    return float(cos.min())


@torch.inference_mode()
def accuracy_probe(model, ids: torch.Tensor, px: torch.Tensor, new_tokens: int) -> dict[str, Any]:
    """Encoder features, last-position prefill logits and greedy tokens of one variant."""
    feats = model.encode_images(px).float().cpu()
    logits = model(ids, pixel_values=px, logits_to_keep=1).logits[:, -1].float().cpu()
    from ..generation import generate

    tokens = generate(model, ids, pixel_values=px, max_new_tokens=new_tokens, eos_token_id=[]).sequences[0].tolist()
    return {"features": feats, "logits": logits, "tokens": tokens}


def compare(probe: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    ld = (probe["logits"] - ref["logits"]).abs().max().item()
    scale = ref["logits"].abs().max().item()
    same = [a == b for a, b in zip(probe["tokens"], ref["tokens"])]
    prefix = next((i for i, s in enumerate(same) if not s), len(same))
    return {
        "feature_cosine": cosine(probe["features"], ref["features"]),
        "feature_max_abs_diff": (probe["features"] - ref["features"]).abs().max().item(),
        "logits_max_abs_diff": ld,
        "logits_rel_diff": ld / scale if scale else None,
        "logits_cosine": cosine(probe["logits"], ref["logits"]),
        "greedy_tokens_same": all(same),
        "greedy_matching_prefix": prefix,
        "greedy_tokens": len(same),
    }


# ---------------------------------------------------------------------------------------------- helpers


def free_memory_gb(device: Optional[torch.device] = None) -> Optional[float]:
    """GB the device can still take: free GPU memory on CUDA, what Metal recommends less what it holds on MPS,
    available RAM on the CPU; None when unknown."""
    try:
        if device is not None and device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0] / 1e9
        if device is not None and device.type == "mps":
            return (torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()) / 1e9
        import psutil

        return psutil.virtual_memory().available / 1e9
    except (ImportError, AttributeError, RuntimeError):  # pragma: no cover - no psutil, or an older torch
        return None


def temp_workdir() -> str:
    return tempfile.mkdtemp(prefix="fastvlm-bench-")


def remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def release(*objs) -> None:
    for o in objs:
        del o
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        mps.empty_cache()


def param_bytes(m: nn.Module) -> int:
    seen, total = set(), 0
    for p in m.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total

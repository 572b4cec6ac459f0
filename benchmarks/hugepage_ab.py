#!/usr/bin/env python
"""Do transparent huge pages speed up batch-1 decoding? An interleaved A/B of where the weights live.

  python benchmarks/hugepage_ab.py          # 0.5B shapes, bf16; writes benchmarks/results/hugepage-ab-cpu.json

Batch-1 decoding reads every weight once per token, so its speed is the memory read rate. PyTorch's CPU
allocator (glibc malloc) places weights on 4 KB pages unless the system's THP setting is "always"; on the
common "madvise" setting, 2 MB pages come only to memory that asks for them. With 4 KB pages a 1 GB read
crosses 262,144 page boundaries, where the hardware prefetchers stop and a TLB miss may wait for a page walk.

This builds the 0.5B LLM's decode-step matrices (24 layers of q/k/v/o/gate/up/down, and the LM head) twice,
with the same values: once as ordinary tensors, once carved out of one anonymous mapping advised
MADV_HUGEPAGE (2 MB aligned), and each round reads both through the native matrix-vector kernel
(fastvlm.kernels.gemv, as the decode step does), in an order that alternates every round. It also times a
plain `sum()` of a 1 GB buffer of each kind: the read-bandwidth measure the bench's decode bound uses.
Whether huge pages were granted is read from /proc/self/smaps (AnonHugePages of the mapping).

With --model-steps N it then times the real thing: two copies of the model with the same random weights, both
made fast (`optimize_for_inference("fast")`), one left as loaded (4 KB pages) and one with every language-model
parameter copied into a huge-page arena like the one above, each decoding with the fast path's native
whole-model step after the same prompt, N steps each, interleaved; the greedy tokens must agree.
"""

from __future__ import annotations

import argparse
import mmap
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
HUGE = 2 << 20


def huge_kb_of(addresses: list[int]) -> int:
    """AnonHugePages of the mappings holding any of these addresses, from /proc/self/smaps."""
    kb, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = any(lo <= x < hi for x in addresses)
            elif inside and line.startswith("AnonHugePages:"):
                kb += int(line.split()[1])
    return kb


class HugeArena:
    """One anonymous mapping advised MADV_HUGEPAGE, handed out as 2 MB-aligned tensors."""

    def __init__(self, nbytes: int):
        self.size = nbytes + HUGE
        self.map = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.map.madvise(mmap.MADV_HUGEPAGE)
        self.raw = torch.frombuffer(self.map, dtype=torch.uint8)
        self.start = self.raw.data_ptr()
        self.offset = (-self.start) % HUGE

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()
        if self.offset + n > self.size:
            raise MemoryError("arena full")
        t = self.raw[self.offset:self.offset + n].view(dtype).view(shape)
        self.offset += (n + 63) // 64 * 64
        return t

    def huge_kb(self) -> int:
        return huge_kb_of([self.start])


def shapes(preset: str) -> list[tuple[int, int]]:
    from fastvlm.config import get_preset

    t = get_preset(preset).text
    h, inter, layers = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
    kv = h // t["num_attention_heads"] * t["num_key_value_heads"]
    per_layer = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)]
    return per_layer * layers + [(t["vocab_size"], h)]


def model_steps(a, dtype: torch.dtype) -> dict:
    from fastvlm import FastVLM
    from fastvlm.kernels.decode_model import NativeQwen2Decoder

    lms = {}
    for arm in ("4k", "thp"):
        model = FastVLM.from_preset(a.preset, device="cpu", dtype=dtype, seed=0)
        model.optimize_for_inference("fast")
        lms[arm] = model.language_model
    params = list(lms["thp"].parameters())
    arena = HugeArena(sum(p.numel() * p.element_size() + 64 for p in params))
    with torch.no_grad():
        for p in params:
            t = arena.empty(tuple(p.shape), p.dtype)
            t.copy_(p.data)
            p.data = t
    vocab = lms["4k"].get_input_embeddings().weight.shape[0]
    ids = torch.randint(3, min(1000, vocab), (1, a.context), generator=torch.Generator().manual_seed(0))
    from transformers import DynamicCache

    from fastvlm.generation import cache_argument

    kw = cache_argument(lms["4k"])
    granted = {arm: huge_kb_of([p.data_ptr() for p in lm.parameters()]) // 1024 for arm, lm in lms.items()}
    state = {}
    with torch.inference_mode():
        for arm, lm in lms.items():
            cache = DynamicCache()
            out = lm(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})
            native = NativeQwen2Decoder.for_model(lm, a.context + a.model_steps + 4)
            if native is None:
                raise SystemExit("the native whole-model decode step does not run here")
            native.load_cache(cache, a.context)
            state[arm] = [native, int(out.logits[0, -1].argmax()), a.context]
        times: dict[str, list[float]] = {arm: [] for arm in lms}
        tokens: dict[str, list[int]] = {arm: [] for arm in lms}
        for r in range(a.model_steps + 2):  # two warm-up steps
            for arm in (list(lms) if r % 2 == 0 else list(lms)[::-1]):
                native, tok, pos = state[arm]
                t = time.perf_counter()
                tok = int(native.step(tok, pos).argmax())
                dt = time.perf_counter() - t
                state[arm][1:] = [tok, pos + 1]
                tokens[arm].append(tok)
                if r >= 2:
                    times[arm].append(dt)
    med = {arm: 1e3 * statistics.median(v) for arm, v in times.items()}
    return {
        "what": "native whole-model decode steps, bf16/fp32 as --dtype, after the same prompt; language-model "
                "weights as loaded (4 KB pages) vs copied into a MADV_HUGEPAGE arena",
        "context": a.context, "steps": a.model_steps, "huge_pages_granted_mb": granted,
        "step_ms_median": med,
        "step_ms": {arm: [round(1e3 * t, 3) for t in v] for arm, v in times.items()},
        "thp_over_4k_median_of_pairs": statistics.median(b / x for x, b in zip(times["4k"], times["thp"])),
        "same_tokens": tokens["4k"] == tokens["thp"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="fastvlm-0.5b")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--rounds", type=int, default=16)
    p.add_argument("--model-steps", type=int, default=0,
                   help="also time N native decode steps of the whole model in each placement, interleaved")
    p.add_argument("--context", type=int, default=288, help="prompt tokens before the model's timed steps")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/results/hugepage-ab-cpu.json)")
    a = p.parse_args()
    from fastvlm import kernels
    from fastvlm.bench.report import write_json

    started, load_start = time.strftime("%Y-%m-%dT%H:%M:%S%z"), list(os.getloadavg())

    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    if sys.platform != "linux" or not hasattr(mmap, "MADV_HUGEPAGE"):
        p.error("needs Linux with madvise(MADV_HUGEPAGE)")
    if not kernels.available(dtype):
        p.error(f"needs the native kernels: {kernels.status()}")
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        thp_setting = f.read().strip()
    mats = shapes(a.preset)
    esize = torch.empty(0, dtype=dtype).element_size()
    nbytes = sum(o * i for o, i in mats) * esize
    torch.manual_seed(0)
    plain = [torch.randn(o, i).to(dtype) for o, i in mats]
    arena = HugeArena(nbytes + 64 * len(mats))
    huge = []
    for w in plain:
        t = arena.empty(tuple(w.shape), dtype)
        t.copy_(w)
        huge.append(t)
    xs = {i: torch.randn(i).to(dtype) for i in {i for _, i in mats}}
    read_plain = torch.ones(1 << 30, dtype=torch.uint8).view(torch.float32)
    read_arena = HugeArena(1 << 30)
    read_huge = read_arena.empty((1 << 28,), torch.float32)
    read_huge.fill_(1.0)

    def step(ws: list[torch.Tensor]) -> float:
        t = time.perf_counter()
        for w in ws:
            kernels.gemv(xs[w.shape[1]], w)
        return time.perf_counter() - t

    def read(buf: torch.Tensor) -> float:
        t = time.perf_counter()
        buf.sum()
        return time.perf_counter() - t

    for ws in (plain, huge):  # warm-up
        step(ws)
    arms = {"4k": (plain, read_plain), "thp": (huge, read_huge)}
    times: dict[str, list[float]] = {k: [] for k in arms}
    reads: dict[str, list[float]] = {k: [] for k in arms}
    for r in range(a.rounds):
        order = list(arms) if r % 2 == 0 else list(arms)[::-1]
        for k in order:
            times[k].append(step(arms[k][0]))
            reads[k].append(read(arms[k][1]))
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(
            f"{k} {1e3 * times[k][-1]:.1f} ms, sum {1.0 / reads[k][-1]:.1f} GB/s" for k in arms), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    gbps = {k: nbytes / med[k] / 1e9 for k in arms}
    read_gbps = {k: (1 << 30) / statistics.median(v) / 1e9 for k, v in reads.items()}
    paired = [b / a_ for a_, b in zip(times["4k"], times["thp"])]
    out = {
        "what": "one decode step's matrix-vector products (native kernel) on weights in 4 KB pages vs transparent "
                "huge pages, interleaved; and sum() of 1 GB of each",
        "command": "python benchmarks/hugepage_ab.py " + " ".join(sys.argv[1:]),
        "started": started,
        "machine": {"cpu": kernels.cpuinfo_field("model name") or platform.processor(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__, "platform": platform.platform(),
                    "load_average_start": load_start, "load_average_end": list(os.getloadavg())},
        "thp_setting": thp_setting,
        "huge_pages_granted_mb": {"weights": arena.huge_kb() // 1024, "read_buffer": read_arena.huge_kb() // 1024},
        "weight_mb": nbytes / 1e6,
        "preset": a.preset,
        "dtype": a.dtype,
        "rounds": a.rounds,
        "step_s": {k: {"median": med[k], "samples": v} for k, v in times.items()},
        "gemv_read_gbps": gbps,
        "sum_read_gbps": read_gbps,
        "thp_over_4k_step_time_median_of_pairs": statistics.median(paired),
    }
    del plain, huge, arena, read_plain, read_huge, read_arena
    if a.model_steps:
        out["model"] = model_steps(a, dtype)
        out["machine"]["load_average_end"] = list(os.getloadavg())
        m = out["model"]
        print(f"model step: 4k {m['step_ms_median']['4k']:.1f} ms, thp {m['step_ms_median']['thp']:.1f} ms; thp/4k "
              f"per pair, median {m['thp_over_4k_median_of_pairs']:.3f}; same greedy tokens: {m['same_tokens']}")
    path = a.out or os.path.join(HERE, "results", "hugepage-ab-cpu.json")
    write_json(out, path)
    print(f"huge pages granted: {out['huge_pages_granted_mb']} MB (THP setting: {thp_setting})")
    print(f"step: 4k {1e3 * med['4k']:.1f} ms ({gbps['4k']:.1f} GB/s), thp {1e3 * med['thp']:.1f} ms "
          f"({gbps['thp']:.1f} GB/s); thp/4k per pair, median {out['thp_over_4k_step_time_median_of_pairs']:.3f}")
    print(f"sum(): 4k {read_gbps['4k']:.1f} GB/s, thp {read_gbps['thp']:.1f} GB/s")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

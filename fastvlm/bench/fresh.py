"""transformers' FastVLM port timed in a process of its own: ``python -m fastvlm.bench.fresh ...``.

The in-process baseline of ``fastvlm bench`` shares the benchmark's process: its allocator
settings (``fastvlm.kernels.tune_allocator``), its warm heap and whatever ran before. A user
who runs transformers on its own gets none of that, and on the CPU the allocator alone moves
an fp32 encoder by a factor of about 1.6 (benchmarks/results/profile-cpu*.json). This worker
loads the port from a directory written by the benchmark (the same weights), times it with
glibc's default settings and prints one JSON line with the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any, Optional


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastvlm.bench.fresh", description=__doc__.splitlines()[0])
    p.add_argument("--hf-dir", required=True, help="a checkpoint in transformers' FastVLM layout")
    p.add_argument("--dtype", required=True, choices=("fp32", "bf16", "fp16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--image-tokens", type=int, required=True)
    p.add_argument("--text-tokens", type=int, required=True)
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet-wait", type=float, default=0.0)
    p.add_argument("--quiet-below", type=float, default=15.0)
    a = p.parse_args(argv)

    import torch

    from . import suite

    if a.threads:
        torch.set_num_threads(a.threads)
    suite.QUIET.update(max_wait_s=a.quiet_wait, busy_below=a.quiet_below)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    hf = suite.TransformersVariant.load(a.hf_dir, dtype, torch.device(a.device))
    ids = suite.prompt_ids(a.image_tokens, a.text_tokens, vocab=a.vocab, seed=a.seed)
    px = suite.image(a.resolution, seed=a.seed + 1)
    samples, rounds = suite.interleaved({"transformers": lambda: hf.run(ids, px, a.new_tokens)}, a.warmup, a.repeats,
                                   log_fn=lambda msg: print(msg, file=sys.stderr, flush=True),
                                   label=f"fresh process {a.dtype} {a.resolution}px")
    out = samples["transformers"].summary()
    out["tokens"] = rounds[-1]["transformers"]["tokens"]  # greedy tokens of the last run, for checking
    print(json.dumps(out), flush=True)
    return 0


def run_fresh(hf_dir: str, *, dtype: str, device: str, resolution: int, image_tokens: int, text_tokens: int,
              vocab: int, new_tokens: int, warmup: int, repeats: int, seed: int, threads: int,
              quiet_wait: float, quiet_below: float, timeout_s: float = 3600) -> dict[str, Any]:
    """Run the worker with the same measurement settings; returns its summary (raises with its log on failure)."""
    cmd = [sys.executable, "-m", "fastvlm.bench.fresh", "--hf-dir", hf_dir, "--dtype", dtype, "--device", device,
           "--resolution", str(resolution), "--image-tokens", str(image_tokens), "--text-tokens", str(text_tokens),
           "--vocab", str(vocab), "--new-tokens", str(new_tokens), "--warmup", str(warmup),
           "--repeats", str(repeats), "--seed", str(seed), "--threads", str(threads),
           "--quiet-wait", str(quiet_wait), "--quiet-below", str(quiet_below)]
    env = dict(os.environ)
    for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD"):
        env.pop(var, None)  # glibc's defaults, as a plain `python` gets them
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"fresh-process transformers run failed (exit {proc.returncode}): "
                           f"{proc.stderr.strip()[-2000:]}")
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"fresh-process transformers run printed no result: {proc.stdout[-1000:]}")


if __name__ == "__main__":
    raise SystemExit(main())

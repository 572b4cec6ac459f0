#!/usr/bin/env python
"""bf16 logits against fp32 with the LLM's rotary tables (inv_freq) kept in fp32, as fastvlm now keeps them,
and cast to bf16, as `model.to(torch.bfloat16)` did before 2026-11-28. The 0.5B preset with random weights,
a text prompt of N random tokens (a 1024 px image makes prompts of ~290 tokens). Random weights attend
diffusely, so this understates what a trained model's position-sensitive heads would show.

  python benchmarks/rotary_dtype_ab.py --tokens 600 --out benchmarks/results/rotary-dtype-ab.json
"""

from __future__ import annotations

import argparse
import json
import platform

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=600)
    ap.add_argument("--preset", default="fastvlm-0.5b")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from fastvlm import FastVLM
    from fastvlm.kernels import cpuinfo_field

    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (1, args.tokens))
    m32 = FastVLM.from_preset(args.preset, dtype=torch.float32)
    with torch.inference_mode():
        ref = m32.language_model(input_ids=ids).logits[0].float()
    del m32
    m16 = FastVLM.from_preset(args.preset, dtype=torch.bfloat16)
    rot = m16.language_model.model.rotary_emb

    def measure() -> dict:
        with torch.inference_mode():
            x = m16.language_model(input_ids=ids).logits[0].float()
        cos = torch.nn.functional.cosine_similarity(x, ref, dim=-1)
        return {"inv_freq_dtype": str(rot.inv_freq.dtype).replace("torch.", ""),
                "logit_cosine_mean": cos.mean().item(), "logit_cosine_min": cos.min().item(),
                "logit_cosine_mean_last_100": cos[-100:].mean().item(),
                "argmax_agreement_with_fp32": (x.argmax(-1) == ref.argmax(-1)).float().mean().item()}

    rows = [measure()]
    rot.inv_freq = rot.inv_freq.to(torch.bfloat16)
    rot.original_inv_freq = rot.original_inv_freq.to(torch.bfloat16)
    rows.append(measure())
    result = {"preset": args.preset, "weights": "random", "prompt_tokens": args.tokens, "rows": rows,
              "machine": {"cpu_model": cpuinfo_field("model name") or platform.processor(),
                          "torch_threads": torch.get_num_threads(), "torch": torch.__version__}}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python
"""The paper's resolution-latency-accuracy thesis in miniature, on the synthetic benchmark.

For models trained by the same recipe at several input resolutions (see
scripts/train_bundled_model.sh), this reads each model's `fastvlm eval` summary on the
synthetic test split and measures, in this one process, batch-1 time-to-first-token:

  * ours: the trained FastVLM (its reduced FastViTHD: 64x downsampling, (res/64)^2 tokens, or 128x with
    a sixth stage, scripts/add_encoder_stage.py);
  * ViT-style: a plain ViT encoder with the same parameter count and 16-pixel patches
    ((res/16)^2 tokens, as CLIP/SigLIP-style encoders give) feeding the same trained LLM
    through a projector of the same shape, with random weights (latency does not depend on
    weight values; it has no accuracy to report).

Both are timed interleaved (one of each per round, medians over rounds after warm-up) so a
burst of load from elsewhere on the machine hits both alike. Writes
OUT.json (accuracy per question type and text size, TTFT split into encoder and prefill,
growth ratios against the lowest resolution) and OUT.png (small-text accuracy and TTFT
against resolution).

  python benchmarks/resolution_study.py \\
      --run 128=runs/bundled/res128/final,runs/bundled/eval-128 \\
      --run 256=runs/bundled/res256/final,runs/bundled/eval-256 \\
      --out benchmarks/results/resolution-study
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

PROMPT = "What number is written in the image?"


def parse_run(spec: str) -> tuple[int, str, str]:
    try:
        res, rest = spec.split("=", 1)
        model_dir, eval_dir = rest.split(",", 1)
        return int(res), model_dir, eval_dir
    except ValueError:
        raise SystemExit(f"--run expects RES=MODEL_DIR,EVAL_DIR, got {spec!r}") from None


def vit_style_encoder(resolution: int, width: int, depth: int, patch: int = 16) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth,
                           num_attention_heads=max(1, width // 64), image_size=resolution, patch_size=patch)
    cfg._attn_implementation = "sdpa"
    return CLIPVisionModel(cfg).eval()


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def matched_vit(resolution: int, target_params: int) -> tuple[nn.Module, int, int]:
    """The ViT (width 64k, depth d) whose parameter count is closest to the FastViTHD's."""
    best = None
    for width in (128, 192, 256, 320, 384):
        for depth in range(1, 13):
            approx = depth * 12 * width * width + 3 * 16 * 16 * width
            if best is None or abs(approx - target_params) < abs(best[0] - target_params):
                best = (approx, width, depth)
    _, width, depth = best
    torch.manual_seed(0)
    return vit_style_encoder(resolution, width, depth), width, depth


def measure(res: int, model_dir: str, rounds: int, warmup: int) -> dict:
    from fastvlm import FastVLM
    from fastvlm.processing import build_prompt, tokenize_prompt

    model = FastVLM.from_pretrained(model_dir, device="cpu", dtype=torch.float32)
    model.optimize_for_inference("fast")
    enc_params = n_params(model.vision_tower)
    vit, width, depth = matched_vit(res, enc_params)
    vit_tokens = (res // 16) ** 2
    hidden = model.config.hidden_size
    torch.manual_seed(0)
    vit_proj = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden)).eval()
    lm = model.language_model

    prompt = build_prompt([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}])
    ids = tokenize_prompt(prompt, model.processor.tokenizer, 1)  # one -200 slot: both encoders' tokens go there
    slot = ids.index(-200)
    text_ids = torch.tensor([ids[:slot] + ids[slot + 1:]])
    with torch.inference_mode():
        text_embeds = model.get_input_embeddings()(text_ids)
    pre, post = text_embeds[:, :slot], text_embeds[:, slot:]  # the image goes where <image> was
    g = torch.Generator().manual_seed(0)
    px = torch.rand(1, 3, res, res, generator=g)

    def ours_encode(x):
        return model.encode_images(x)

    def vit_encode(x):
        return vit(pixel_values=x).last_hidden_state[:, 1:]

    variants = {"fastvithd": (ours_encode, model.mm_projector), "vit": (vit_encode, vit_proj)}
    samples: dict[str, list[float]] = {}
    tokens = {}
    for r in range(warmup + rounds):
        for name, (enc, proj) in variants.items():
            e, p, n = time_once(enc, proj, lm, pre, post, px)
            tokens[name] = n
            if r >= warmup:
                for key, value in (("encode", e), ("prefill", p), ("ttft", e + p)):
                    samples.setdefault(f"{name}.{key}", []).append(value)
    out = {"resolution": res, "threads": torch.get_num_threads()}
    for name in variants:
        out[name] = {
            "encoder_params": enc_params if name == "fastvithd" else n_params(vit),
            "visual_tokens": model.num_image_tokens if name == "fastvithd" else vit_tokens,
            "prompt_tokens": tokens[name],
            **{f"{key}_ms": 1e3 * statistics.median(samples[f"{name}.{key}"])
               for key in ("encode", "prefill", "ttft")},
        }
    out["vit"]["config"] = {"width": width, "depth": depth, "patch": 16, "library": "transformers CLIPVisionModel"}
    return out


@torch.inference_mode()
def time_once(encode, project, lm, pre, post, pixels) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    feats = project(encode(pixels))
    t1 = time.perf_counter()
    embeds = torch.cat([pre, feats.to(pre.dtype), post], dim=1)
    out = lm(inputs_embeds=embeds, logits_to_keep=1, use_cache=True)
    out.logits[:, -1].argmax(-1)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, embeds.shape[1]


def read_eval(eval_dir: str) -> dict:
    path = os.path.join(eval_dir, "summary.json")
    with open(path) as f:
        s = json.load(f)
    b = s["breakdown"]
    return {
        "summary_file": path,
        "n": s["n"],
        "accuracy": s["scores"]["accuracy"],
        "by_question_type": {k: {"n": v["n"], "accuracy": v["accuracy"]} for k, v in b["question_type"].items()},
        "by_text_size": {k: {"n": v["n"], "accuracy": v["accuracy"]} for k, v in b["text_size"].items()},
        "model": s.get("model"),
        "resolution": s.get("resolution"),
    }


def _size_key(bucket: str) -> float:
    digits = "".join(c if c.isdigit() else " " for c in bucket).split()
    return float(digits[0]) if digits else 0.0


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["runs"]
    res = [r["resolution"] for r in rows]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 4.4))
    types = sorted({k for r in rows for k in r["eval"]["by_question_type"]})
    for qt in types:
        a1.plot(res, [100 * r["eval"]["by_question_type"].get(qt, {}).get("accuracy", float("nan")) for r in rows],
                marker="o", label=qt)
    a1.plot(res, [100 * r["eval"]["accuracy"] for r in rows], marker="s", color="black", lw=2, label="all questions")
    a1.set_xlabel("input resolution (px)")
    a1.set_ylabel("exact match on the synthetic test split (%)")
    a1.set_title("Accuracy per question type")
    a1.set_xticks(res)
    a1.legend(fontsize=7)
    a1.grid(alpha=0.3)
    for name, label in (("fastvithd", "FastViTHD (reduced; tokens in the table)"),
                        ("vit", "ViT-style, same params ((res/16)^2 tokens)")):
        a2.plot(res, [r["ttft"][name]["ttft_ms"] for r in rows], marker="o", label=label)
    a2.set_xlabel("input resolution (px)")
    a2.set_ylabel("TTFT at batch 1 (ms)")
    a2.set_title(f"TTFT, {report['machine']['threads']} CPU threads, fp32")
    a2.set_xticks(res)
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3)
    # the paper's trade-off plot: accuracy against measured TTFT, one point per trained resolution
    xs = [r["ttft"]["fastvithd"]["ttft_ms"] for r in rows]
    a3.plot(xs, [100 * r["eval"]["accuracy"] for r in rows], marker="o", color="black")
    for x, r in zip(xs, rows):
        a3.annotate(f"{r['resolution']} px", (x, 100 * r["eval"]["accuracy"]), xytext=(5, -12),
                    textcoords="offset points", fontsize=8)
    a3.set_xlabel("TTFT at batch 1 (ms)")
    a3.set_ylabel("exact match, all questions (%)")
    a3.set_title("Accuracy against TTFT (same recipe)")
    a3.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", default=[], metavar="RES=MODEL_DIR,EVAL_DIR",
                   help="a trained model, the resolution it was trained at and its `fastvlm eval --out` directory")
    p.add_argument("--rounds", type=int, default=30, help="timed rounds per resolution (default 30)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results/resolution-study", help="output path stem")
    p.add_argument("--replot", action="store_true", help="redraw OUT.png and reprint the table from OUT.json "
                   "without measuring")
    args = p.parse_args()
    if args.replot:
        with open(args.out + ".json") as f:
            report = json.load(f)
        plot(report, args.out + ".png")
        print(markdown(report))
        return 0
    if not args.run:
        p.error("give at least one --run RES=MODEL_DIR,EVAL_DIR (or --replot)")
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = sorted(parse_run(s) for s in args.run)
    import transformers

    import fastvlm

    report = {
        "command": "python benchmarks/resolution_study.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "logical_cores": os.cpu_count(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "fastvlm": fastvlm.__version__,
                    "load_average_start": list(os.getloadavg())},
        "dtype": "fp32",
        "statistic": "TTFT medians over interleaved rounds after warm-up; accuracy from `fastvlm eval`",
        "runs": [],
    }
    for res, model_dir, eval_dir in runs:
        ev = read_eval(eval_dir)
        if ev["resolution"] not in (None, res):
            raise SystemExit(f"{eval_dir} evaluated at {ev['resolution']} px, but --run says {res}")
        print(f"[{res}px] measuring TTFT ...", file=sys.stderr)
        t = measure(res, model_dir, args.rounds, args.warmup)
        report["runs"].append({"resolution": res, "model_dir": model_dir, "eval": ev, "ttft": t})
        print(f"[{res}px] accuracy {100 * ev['accuracy']:.1f}%  TTFT ours {t['fastvithd']['ttft_ms']:.1f} ms "
              f"({t['fastvithd']['visual_tokens']} tokens) vs ViT-style {t['vit']['ttft_ms']:.1f} ms "
              f"({t['vit']['visual_tokens']} tokens)", file=sys.stderr)
    base = report["runs"][0]
    for r in report["runs"]:
        r["growth_vs_lowest"] = {
            name: r["ttft"][name]["ttft_ms"] / base["ttft"][name]["ttft_ms"] for name in ("fastvithd", "vit")}
        r["vit_over_ours_ttft"] = r["ttft"]["vit"]["ttft_ms"] / r["ttft"]["fastvithd"]["ttft_ms"]
    report["machine"]["load_average_end"] = list(os.getloadavg())
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    plot(report, args.out + ".png")
    print(markdown(report))
    print(f"wrote {args.out}.json and {args.out}.png", file=sys.stderr)
    return 0


def markdown(report: dict) -> str:
    rows = report["runs"]
    buckets = sorted({k for r in rows for k in r["eval"]["by_text_size"]}, key=_size_key)
    types = sorted({k for r in rows for k in r["eval"]["by_question_type"]})
    head = ["res", "all", *types, *(f"text {b}" for b in buckets), "tokens", "TTFT ms", "ViT-style tokens",
            "ViT-style TTFT ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        e, t = r["eval"], r["ttft"]
        cells = [str(r["resolution"]), f"{100 * e['accuracy']:.1f}"]
        cells += [f"{100 * e['by_question_type'][k]['accuracy']:.1f}" if k in e["by_question_type"] else "-"
                  for k in types]
        cells += [f"{100 * e['by_text_size'][b]['accuracy']:.1f}" if b in e["by_text_size"] else "-" for b in buckets]
        cells += [str(t["fastvithd"]["visual_tokens"]), f"{t['fastvithd']['ttft_ms']:.1f}",
                  str(t["vit"]["visual_tokens"]), f"{t['vit']['ttft_ms']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Terminal tables, the JSON file and the PNG plots of a `fastvlm bench` report."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional


def _ms(summary: Optional[dict]) -> str:
    if not summary or summary.get("median") is None:
        return "-"
    return f"{summary['median'] * 1000:.0f}"


def _num(v: Optional[float], fmt: str = "{:.2f}") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _pct(fraction: Optional[float]) -> str:
    return _num(None if fraction is None else 100 * fraction, "{:.0f}%")


def _tps(summary: Optional[dict]) -> str:
    if not summary or summary.get("median") is None:
        return "-"
    return f"{summary['median']:.1f}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def format_report(report: dict[str, Any]) -> str:
    parts = []
    m = report["machine"]
    parts.append(f"machine: {m.get('gpu') or m['cpu_model']} | {m['logical_cores']} cores, {m['torch_threads']} threads | "
                 f"torch {m['torch']} | transformers {m['transformers']} | load {m.get('load_average_start')} -> "
                 f"{m.get('load_average_end')}")
    roof = report.get("roofline") or {}
    if roof:
        mm = ", ".join(f"{k} {v['gflops_best']:.0f}" for k, v in roof.get("matmul", {}).items())
        bw = roof.get("read_bandwidth", {}).get("gbps_best")
        per_run = [x for r in report["results"] + report["transformers"]
                   for x in r.get("roofline", {}).get("read_bandwidth_per_run_gbps", [])]
        drift = f" at the start; {min(per_run):.1f}-{max(per_run):.1f} GB/s right before the timed runs" if per_run else ""
        parts.append(f"roofline (best of repeats): matmul GFLOP/s {mm} | memory read {_num(bw, '{:.1f}')} GB/s{drift}")
    headers = ["model", "dtype", "mode", "res", "tokens", "encode ms", "proj ms", "prefill ms", "TTFT ms",
               "decode tok/s", "peak MiB", "TTFT/HF", "TTFT/HF fresh", "TTFT/roof", "enc %peak", "prefill %peak",
               "dec %bound", "dec %bound/run"]
    rows = []
    for r in report["results"] + report["transformers"]:
        rf = r.get("roofline", {})
        rows.append([
            r["model"], r["dtype"], r["mode"], str(r["resolution"]), str(r["image_tokens"]),
            _ms(r.get("encode_s")), _ms(r.get("projector_s")), _ms(r.get("prefill_s")), _ms(r.get("ttft_s")),
            _tps(r.get("decode_tokens_per_s")), _num(r.get("peak_mb"), "{:.0f}"),
            _num(r.get("ttft_over_transformers")), _num(r.get("ttft_over_transformers_fresh")),
            _num(rf.get("ttft_over_roofline")), _pct(rf.get("encoder_fraction_of_peak")),
            _pct(rf.get("prefill_fraction_of_peak")),
            _pct(rf.get("decode_fraction_of_bound")), _pct(rf.get("decode_fraction_of_bound_paired")),
        ])
    parts.append(_table(headers, rows))
    if report.get("accuracy"):
        headers = ["model", "dtype", "mode", "res", "feature cos", "max|dlogit|", "rel dlogit", "greedy same", "prefix"]
        rows = [[a["model"], a["dtype"], a["mode"], str(a["resolution"]), f"{a['feature_cosine']:.6f}",
                 f"{a['logits_max_abs_diff']:.3g}", _num(a.get("logits_rel_diff"), "{:.3g}"),
                 str(a["greedy_tokens_same"]), f"{a['greedy_matching_prefix']}/{a['greedy_tokens']}"]
                for a in report["accuracy"]]
        parts.append("accuracy against our fp32 exact path:\n" + _table(headers, rows))
    if report.get("encoder_baselines"):
        headers = ["baseline", "dtype", "tokens", "encode ms", "prefill ms", "TTFT ms", "vs FastVLM", "TTFT x", "enc x",
                   "paper"]
        rows = []
        for b in report["encoder_baselines"]:
            paper = "; ".join(f"{p['what']}: {p['ratio']:.1f}x" for p in b["paper"])
            rows.append([b["name"], b["dtype"], str(b["visual_tokens"]), _ms(b.get("encode_s")), _ms(b.get("prefill_s")),
                         _ms(b.get("ttft_s")), f"@{b['fastvlm_resolution']} {_ms(b.get('fastvlm_ttft_s'))} ms",
                         _num(b.get("ttft_ratio")), _num(b.get("encoder_ratio")), paper])
        parts.append("paper's encoders, same LLM prefill (ratios = baseline / FastVLM, paired per round):\n"
                     + _table(headers, rows))
    for note in report.get("notes", []):
        parts.append(f"note: {note}")
    return "\n\n".join(parts)


def write_json(report: dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)
        f.write("\n")


def write_plots(report: dict[str, Any], stem: str) -> list[str]:
    """TTFT against resolution (every model/dtype/mode, baselines as points) and encoder/prefill shares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = report["results"] + report["transformers"]
    if not rows:
        return written
    series: dict[tuple, list] = {}
    for r in rows:
        if r.get("ttft_s") and r["ttft_s"].get("median") is not None:
            series.setdefault((r["model"], r["dtype"], r["mode"]), []).append(r)
    machine = report["machine"].get("gpu") or report["machine"]["cpu_model"]

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for (model, dtype, mode), rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["resolution"])
        xs = [r["resolution"] for r in rs]
        ys = [r["ttft_s"]["median"] * 1000 for r in rs]
        style = "s--" if mode.startswith("transformers") else "o-"
        ax.plot(xs, ys, style, label=f"{model} {dtype} {mode}", markersize=4)
    for b in report.get("encoder_baselines", []):
        if b.get("ttft_s"):
            x = b["input_resolution"] * (3 if b["encoder_passes"] > 1 else 1)
            ax.plot([x], [b["ttft_s"]["median"] * 1000], "x", markersize=9)
            ax.annotate(f"{b['name']} ({b['dtype']})", (x, b["ttft_s"]["median"] * 1000), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("input resolution (px, square)")
    ax.set_ylabel("time to first token (ms, median)")
    ax.set_yscale("log")
    ax.set_title(f"TTFT vs resolution, batch 1 | {machine}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = f"{stem}-ttft.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    # encoder / projector / prefill shares of TTFT, one panel per (model, dtype, mode) of ours
    ours = [(k, v) for k, v in sorted(series.items()) if not k[2].startswith("transformers")]
    if ours:
        n = len(ours)
        cols = min(n, 3)
        nrows = math.ceil(n / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
        for ax, ((model, dtype, mode), rs) in zip(axes.flat, ours):
            rs = sorted(rs, key=lambda r: r["resolution"])
            labels = [str(r["resolution"]) for r in rs]
            enc = [r["encode_s"]["median"] * 1000 for r in rs]
            proj = [(r.get("projector_s") or {}).get("median", 0) * 1000 for r in rs]
            pre = [r["prefill_s"]["median"] * 1000 for r in rs]
            ax.bar(labels, enc, label="image encoder")
            ax.bar(labels, proj, bottom=enc, label="projector")
            ax.bar(labels, pre, bottom=[a + b for a, b in zip(enc, proj)], label="LLM prefill")
            for i in range(len(rs)):
                total = enc[i] + proj[i] + pre[i]
                if total > 0:
                    ax.text(i, total, f"{100 * enc[i] / total:.0f}%", ha="center", va="bottom", fontsize=7)
            ax.set_title(f"{model} {dtype} {mode}", fontsize=9)
            ax.set_xlabel("resolution (label: encoder share)", fontsize=8)
            ax.set_ylabel("ms (median)", fontsize=8)
            ax.tick_params(axis="x", labelsize=7, rotation=45)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(f"Where TTFT goes | {machine}", fontsize=10)
        fig.tight_layout()
        path = f"{stem}-breakdown.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written

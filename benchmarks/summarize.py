#!/usr/bin/env python
"""Render the tables of benchmarks/results/README.md from the JSON files the benchmark commands wrote.

  python benchmarks/summarize.py                 # prints markdown for every result file present
  python benchmarks/summarize.py --dir OTHER_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def load(d: str, name: str):
    path = os.path.join(d, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def ms(s) -> str:
    return "-" if not s or s.get("median") is None else f"{s['median'] * 1000:,.0f}"


def num(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def table(headers, rows) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def machine_line(r) -> str:
    m = r["machine"]
    rf = r.get("roofline") or {}
    mm = ", ".join(f"{k} {v['gflops_best']:.0f}" for k, v in rf.get("matmul", {}).items())
    bw = (rf.get("read_bandwidth") or {}).get("gbps_best")
    what = m.get("gpu") or m["cpu_model"]
    return (f"{what}, {m['logical_cores']} cores, {m['torch_threads']} threads; torch {m['torch']}, transformers "
            f"{m['transformers']}; load average {m.get('load_average_start')} -> {m.get('load_average_end')}; "
            f"allocator: {m.get('allocator', 'default')}" + (f"; matmul GFLOP/s {mm}; read {bw:.1f} GB/s" if mm else ""))


def main_table(r, res=1024) -> str:
    rows = []
    for x in r["results"] + r["transformers"]:
        if x["resolution"] != res:
            continue
        rf = dict(x.get("roofline", {}))
        if x["mode"] == "int8":  # its LLM runs int8 matmuls; files before the fix compared them with the float peak
            rf["ttft_over_roofline"] = rf["prefill_fraction_of_peak"] = None
        dec = rf.get("decode_fraction_of_bound")
        rows.append([x["model"], x["dtype"], x["mode"], ms(x["encode_s"]), ms(x.get("projector_s")), ms(x["prefill_s"]),
                     f"**{ms(x['ttft_s'])}**", num((x.get("decode_tokens_per_s") or {}).get("median"), "{:.1f}"),
                     num(x.get("ttft_over_transformers"), "{:.2f}x"), num(x.get("ttft_over_transformers_fresh"), "{:.2f}x"),
                     num(rf.get("ttft_over_roofline"), "{:.2f}x"), num(rf.get("encoder_fraction_of_peak"), "{:.0%}"), num(rf.get("prefill_fraction_of_peak"), "{:.0%}"),
                     num(dec, "{:.0%}"), num(rf.get("decode_fraction_of_bound_paired"), "{:.0%}"),
                     num(x.get("peak_mb"), "{:,.0f}")])
    return table(["model", "dtype", "mode", "encoder ms", "projector ms", "prefill ms", "TTFT ms", "decode tok/s",
                  "TTFT / transformers", "TTFT / transformers in a fresh process", "TTFT / roofline", "encoder % of matmul peak", "prefill % of peak",
                  "decode % of bandwidth bound", "... of each run's own bound",
                  "peak GPU memory MiB" if r["machine"].get("device") == "cuda" else "process peak RSS MiB"], rows)


def accuracy_table(r) -> str:
    rows = [[a["model"], a["dtype"], a["mode"], f"{a['feature_cosine']:.6f}", f"{a['logits_max_abs_diff']:.3g}",
             num(a.get("logits_rel_diff"), "{:.2g}"), f"{a['logits_cosine']:.5f}",
             f"{a['greedy_matching_prefix']}/{a['greedy_tokens']}"] for a in r["accuracy"]]
    return table(["model", "dtype", "mode", "feature cosine", "max abs logit diff", "rel. logit diff", "logit cosine",
                  "greedy tokens equal to fp32 exact (prefix)"], rows)


def baselines_table(r) -> str:
    rows = []
    for b in r["encoder_baselines"]:
        paper = "; ".join(f"{p['what']}: **{p['ratio']:.1f}x** ({p['paper_numbers']})" for p in b["paper"])
        rows.append([b["description"], b["dtype"], f"{b['encoder_params'] / 1e6:.0f}M", b["visual_tokens"],
                     ms(b["encode_s"]), ms(b["prefill_s"]), ms(b["ttft_s"]),
                     f"{ms(b['fastvlm_ttft_s'])} (@{b['fastvlm_resolution']})",
                     f"**{b['ttft_ratio']:.2f}x**", f"**{b['encoder_ratio']:.2f}x**", paper])
    return table(["encoder", "dtype", "params", "visual tokens", "encoder ms", "prefill ms", "TTFT ms",
                  "FastVLM fast TTFT ms", "TTFT ratio", "encoder ratio", "paper"], rows)


def sweep_table(r) -> str:
    by = {}
    for x in r["results"] + r["transformers"]:
        by.setdefault(x["resolution"], {})[(x["dtype"], x["mode"])] = x
    modes = sorted({k for d in by.values() for k in d})
    rows = []
    for res in sorted(by):
        d = by[res]
        any_row = next(iter(d.values()))
        row = [res, any_row["image_tokens"]]
        for k in modes:
            row.append(ms(d[k]["ttft_s"]) if k in d else "-")
        fast = d.get(("bf16", "fast")) or d.get(("fp16", "fast")) or next(iter(d.values()))
        total = fast["encode_s"]["median"] + fast["prefill_s"]["median"]
        row.append(f"{fast['encode_s']['median'] / total:.0%}")
        row.append(num(fast.get("roofline", {}).get("ttft_over_roofline"), "{:.2f}x"))
        rows.append(row)
    return table(["resolution", "visual tokens"] + [f"TTFT ms {dt} {m}" for dt, m in modes]
                 + ["encoder share of TTFT (fast)", "fast TTFT / roofline"], rows)


def profile_table(p) -> str:
    configs = list(p["encoder"])
    cats = []
    for c in configs:
        for k in p["encoder"][c]["categories_s"]:
            if k not in cats:
                cats.append(k)
    rows = [["**wall (median)**"] + [f"**{p['encoder'][c]['wall_s']['median'] * 1000:,.0f}**" for c in configs]]
    for k in cats:
        rows.append([k] + [f"{p['encoder'][c]['categories_s'].get(k, 0) * 1000:,.0f}" for c in configs])
    out = table(["ms at %d px" % p["resolution"]] + configs, rows)
    if "decode" in p:
        drows = []
        for name, d in p["decode"].items():
            drows.append([name, f"{d['step_s']['median'] * 1000:.1f}", f"{d['tokens_per_s_median']:.1f}"]
                         + [f"{k}: {v * 1000:.1f}" for k, v in d["categories_s"].items()])
        out += "\n\n" + table(["0.5B bf16 decode step", "ms (median)", "tokens/s", "profiled ms by category", "", "",
                                "", ""], drows)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    d = args.dir
    sections = [
        ("bench-0.5b-cpu.json", "0.5B architecture at 1024 px, CPU", [main_table, accuracy_table, baselines_table]),
        ("bench-0.5b-cpu-fresh.json", "0.5B at 1024 px, CPU: transformers in this process and in a fresh one",
         [main_table]),
        ("bench-0.5b-cpu-bf16-paired.json",
         "0.5B at 1024 px, CPU bf16: each decode against the bandwidth read right before its run", [main_table]),
        ("bench-0.5b-sweep-cpu.json", "0.5B, TTFT against resolution, CPU bf16", [sweep_table]),
        ("bench-1.5b-cpu.json", "1.5B architecture, CPU",
         [lambda r: "At 512 px:\n\n" + main_table(r, 512), lambda r: "At 1024 px:\n\n" + main_table(r)]),
        ("bench-7b-cpu.json", "7B architecture, CPU", [main_table]),
        ("bench-0.5b-h100.json", "0.5B architecture, H100", [main_table, sweep_table, accuracy_table, baselines_table]),
        ("bench-0.5b-h200.json", "0.5B architecture, H200 (session 25: its `fast` rows are the eager fused encoder, "
         "its `graphs` rows the same program replayed as a CUDA graph, which `fast` has been on CUDA since)",
         [main_table, sweep_table, accuracy_table, baselines_table]),
        ("bench-0.5b-h200-graphs.json", "0.5B bf16, H200, CUDA graphs as fast's default (session 25; `no-graphs` "
         "is the eager fused encoder)", [main_table]),
    ]
    # the same runs on a second CPU (SUFFIX=-intel bash benchmarks/run_cpu.sh ...) follow the first's
    sections += [(n.replace(".json", "-intel.json"), t.replace("CPU", "CPU (Intel Xeon with AMX)"), f)
                 for n, t, f in sections if "-cpu" in n]
    sections += [
        ("bench-0.5b-cpu-intel-native.json", "0.5B architecture at 1024 px, CPU (Intel Xeon with AMX), "
         "with the bf16 native decode loop (session 20, a busy day on this machine; its fp32 rows predate the fp32 "
         "native step)", [main_table, accuracy_table]),
        ("bench-0.5b-cpu-bf16-paired-intel-native.json", "0.5B at 1024 px, CPU (Intel Xeon with AMX) bf16, paired "
         "decode, with the native decode loop (session 20)", [main_table]),
        ("bench-0.5b-cpu-intel-native-all.json", "0.5B architecture at 1024 px, CPU (Intel Xeon with AMX), with "
         "the native decode loop in bf16 and fp32 (session 20; the roofline read at its start was low, so its "
         "fractions of the peak are not meaningful)", [main_table, accuracy_table]),
        ("bench-0.5b-cpu-bf16-paired-intel-native-2.json", "0.5B at 1024 px, CPU (Intel Xeon with AMX) bf16, "
         "paired decode, with the native decode loop (session 20, second run)", [main_table]),
        ("bench-0.5b-cpu-intel-rerun.json", "0.5B architecture at 1024 px, CPU (Intel Xeon with AMX), the same "
         "code rerun (session 21; its start-of-run bf16 roofline read 799 GFLOP/s, median, against 2,509 in "
         "bench-0.5b-cpu-intel.json, so its fractions of the bf16 peak are not meaningful)",
         [main_table, accuracy_table]),
    ]
    print("Sizes in MiB (2^20 bytes; the JSON's `peak_mb` fields too); GB/s and GFLOP/s in powers of ten. int8 rows "
          "get no TTFT / roofline or prefill % of peak: their LLM runs int8 matmuls, whose peak is not measured "
          "(files written before 2026-11-28 hold such figures, against the float peak; the tables leave them out). "
          "Every CPU run below was timed with a thread sampling memory every 2 ms beside the timed call (in an A/B "
          "run it slowed a tiny model's decode by about a third; its effect at 0.5B was not measured); "
          "`fastvlm bench` now reads the kernel's peak-RSS mark instead, so a rerun may be faster.\n")
    for name, title, fns in sections:
        r = load(d, name)
        if r is None:
            continue
        print(f"### {title} (`{name}`)\n\n{machine_line(r)}\n")
        print("Command: `" + " ".join(r["command"]) + "`\n")
        for fn in fns:
            print(fn(r) + "\n")
        for n in r.get("notes", []):
            print(f"- note: {n}")
        print()
    for name in sorted(f for f in os.listdir(d) if f.startswith("decode-step-") and f.endswith(".json")):
        r = load(d, name)
        bw = sorted(r["read_bandwidth_gbps_per_round"])
        print(f"### One decode step per CPU path, interleaved (`{name}`)\n")
        print(f"{r['machine'].get('cpu_model', '')}, {r['machine']['threads']} threads, torch {r['machine'].get('torch')}; {r['preset']} {r['dtype']}, "
              f"context {r['context']}, {r['rounds']} rounds; read bandwidth {bw[0]}-{bw[-1]} GB/s "
              f"(median {bw[len(bw) // 2]}); greedy tokens equal to the modules': "
              f"{r['greedy_tokens_same_as_modules']} of {r['greedy_tokens']}\n")
        print("Command: `" + r["command"] + "`\n")
        print("| path | step ms (median) | tokens/s | of the paired bandwidth bound |\n|---|---|---|---|")
        for v, row in r["variants"].items():
            print(f"| {v} | {row['step_ms_median']:.1f} | {row['tokens_per_s']:.1f} | "
                  f"{100 * row['fraction_of_bound_paired']:.0f}% |")
        print()
    for name in sorted(f for f in os.listdir(d) if f.startswith("decode-loop-ab") and f.endswith(".json")):
        r = load(d, name)
        bw = sorted(r["read_bandwidth_gbps_per_round"])
        ratio = sorted(r["native_over_layers_per_round"])
        med = statistics.median(ratio)
        same = (f"the first {r['same_greedy_prefix']}" if "same_greedy_prefix" in r
                else f"{r['same_greedy_tokens']} (position by position)")
        print(f"### Whole generations, native decode loop against transformers' loop, interleaved (`{name}`)\n")
        print(f"{r['machine'].get('cpu_model', '')}, {r['machine']['threads']} threads, torch {r['machine'].get('torch')}; "
              f"{r['preset']} {r['dtype']}, {r['context']}-token prompt, {r['new_tokens']} new tokens, {r['rounds']} "
              f"rounds; read bandwidth {bw[0]}-{bw[-1]} GB/s; native / layers per round {ratio[0]}-{ratio[-1]} "
              f"(median {med:.3f}); greedy tokens the same: {same} of {r['greedy_tokens']}"
              + (f"; the native loop's setup {r['native_setup_ms']} ms per generation" if "native_setup_ms" in r else "")
              + "\n")
        check = r.get("fp32_check")
        if check:
            line = "fp32, teacher-forced on each loop's tokens, picks the same token: " + ", ".join(
                f"{v} {n} of {r['greedy_tokens']}" for v, n in check["fp32_agrees"].items())
            diff = check.get("at_first_difference")
            if diff:
                line += (f"; at the first difference (token {diff['index']}) fp32's two best logits are "
                         f"{diff['fp32_top2_gap']} apart, one bf16 step there being {diff['bf16_step_at_top']}")
            print(line + "\n")
        print("Command: `" + r["command"] + "`\n")
        print("| loop | decode tokens/s (median) | of the paired bandwidth bound |\n|---|---|---|")
        for v, row in r["variants"].items():
            print(f"| {v} | {row['decode_tokens_per_s_median']:.1f} | {100 * row['fraction_of_bound_paired']:.0f}% |")
        print()
    for name in sorted(f for f in os.listdir(d) if f.startswith("prepack-ab") and f.endswith(".json")):
        r = load(d, name)
        m = r["machine"]
        print(f"### LLM prefill with oneDNN-prepacked linear weights against plain ones, interleaved (`{name}`)\n")
        print(f"{m.get('cpu', '')}, {m['threads']} threads, torch {m.get('torch')}; 0.5B, {r['tokens']} positions\n")
        print("Command: `" + r["command"] + "`\n")
        print("| dtype | plain ms | packed ms | packed / plain per round (median, range) | same logits | "
              "extra memory |\n|---|---|---|---|---|---|")
        for x in r["results"]:
            q = x["packed_over_plain_per_round"]
            print(f"| {x['dtype']} | {x['plain_ms']['median']:.1f} | {x['packed_ms']['median']:.1f} | "
                  f"{q['median']:.3f} ({q['min']:.3f}-{q['max']:.3f}) | "
                  f"{'yes' if x['same_logits'] else 'max diff %.1e' % x['max_abs_logit_difference']} | "
                  f"+{x['extra_memory_mb']:.0f} MB on {x['llm_weights_mb']:.0f} MB |")
        print()
    for name in sorted(f for f in os.listdir(d) if f.startswith("hugepage-ab") and f.endswith(".json")):
        r = load(d, name)
        m = r["machine"]
        print(f"### Decode weights in transparent huge pages against 4 KB pages, interleaved (`{name}`)\n")
        print(f"{m['cpu']}, {m['threads']} threads, torch {m['torch']}; {r['preset']} {r['dtype']}, "
              f"{r['weight_mb']:.0f} MB of weights; THP setting: {r['thp_setting']}\n")
        print("Command: `" + r["command"] + "`\n")
        print("| what | 4 KB pages | huge pages | huge / 4 KB per pair (median) |\n|---|---|---|---|")
        s, g = r["step_s"], r["gemv_read_gbps"]
        print(f"| every matrix through the kernel, ms ({r['rounds']} rounds) | {1e3 * s['4k']['median']:.1f} "
              f"({g['4k']:.1f} GB/s) | {1e3 * s['thp']['median']:.1f} ({g['thp']:.1f} GB/s) | "
              f"{r['thp_over_4k_step_time_median_of_pairs']:.3f} |")
        print(f"| sum() of 1 GB, GB/s | {r['sum_read_gbps']['4k']:.1f} | {r['sum_read_gbps']['thp']:.1f} | |")
        if "model" in r:
            x = r["model"]
            print(f"| native whole-model decode step, ms ({x['steps']} steps; same tokens: "
                  f"{'yes' if x['same_tokens'] else 'no'}) | {x['step_ms_median']['4k']:.1f} | "
                  f"{x['step_ms_median']['thp']:.1f} | {x['thp_over_4k_median_of_pairs']:.3f} |")
        print()
    for name in ("profile-cpu.json", "profile-cpu-default-allocator.json", "profile-cpu-intel.json",
                 "profile-cpu-default-allocator-intel.json"):
        p = load(d, name)
        if p is not None:
            print(f"### Encoder profile (`{name}`, allocator: {p['machine'].get('allocator', 'default')})\n")
            print("Command: `" + p["command"] + "`\n")
            print(profile_table(p) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

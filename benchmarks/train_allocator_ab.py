#!/usr/bin/env python
"""CPU training with and without `fastvlm.kernels.tune_allocator`, alternated run by run.

  python benchmarks/train_allocator_ab.py --data runs/bundled/data --out benchmarks/results/train-allocator-ab-cpu-intel.json

`fastvlm train` and scripts/pretrain_synth_encoder.py raise glibc's mmap and trim thresholds
(tune_allocator) unless FASTVLM_NO_MALLOPT=1. This runs two jobs, each --rounds times with the
setting on and off in alternating order, in fresh processes, and records the wall, user and
system CPU seconds of each run (from the child's rusage) and the training steps' own time:
  stage2    `fastvlm train synth_stage2` from the bundled model (everything trains, batches of 32,
            256 px), --stage2-steps steps; the step time from the trainer's samples/s (logged every
            10 steps; the median of the windows after the first)
  pretrain  scripts/pretrain_synth_encoder.py, reading objective, batches of 128 at 256 px,
            --pretrain-steps steps on 2,000 training and 500 generated images; the step time is
            the log's "seconds" (training loop and its one validation)
The data is a `fastvlm data synth` folder with its tokenizer (scripts/train_bundled_model.sh step 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def timed(cmd: list[str], env: dict) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(cmd, check=False, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return {"wall_s": round(wall, 1), "user_s": round(after.ru_utime - before.ru_utime, 1),
            "sys_s": round(after.ru_stime - before.ru_stime, 1),
            "major_faults": after.ru_majflt - before.ru_majflt, "minor_faults": after.ru_minflt - before.ru_minflt}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a `fastvlm data synth` folder with tokenizer/")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--stage2-steps", type=int, default=40)
    p.add_argument("--pretrain-steps", type=int, default=20)
    p.add_argument("--jobs", nargs="+", default=["stage2", "pretrain"], choices=("stage2", "pretrain"))
    p.add_argument("--out", required=True)
    a = p.parse_args()
    import torch

    from fastvlm.bench.core import machine_info
    from fastvlm.commands.common import bundled_model_path

    d = os.path.abspath(a.data)
    work = tempfile.mkdtemp(prefix="fastvlm-alloc-ab-")
    results: dict = {job: {"on": [], "off": []} for job in a.jobs}
    try:
        for r in range(a.rounds):
            for setting in (("on", "off") if r % 2 == 0 else ("off", "on")):
                env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), TOKENIZERS_PARALLELISM="false")
                env.pop("FASTVLM_NO_MALLOPT", None)
                if setting == "off":
                    env["FASTVLM_NO_MALLOPT"] = "1"
                if "stage2" in a.jobs:
                    out = os.path.join(work, f"stage2-{r}-{setting}")
                    run = timed([sys.executable, "-m", "fastvlm.cli", "train", "synth_stage2", "--output-dir", out,
                                 "--resume", "never", "--no-progress", "--max-steps", str(a.stage2_steps),
                                 "--set", f"tokenizer={d}/tokenizer", "--set", f"data.train={d}/train.json",
                                 "--set", f"data.val={d}/val.json", "--set", f"data.image_folder={d}",
                                 "--set", f"model={bundled_model_path()}", "--set", "data.num_workers=0",
                                 "--set", "data.val=null", "--set", "output.save_every=0"], env)
                    with open(os.path.join(out, "metrics.jsonl")) as f:
                        rates = [json.loads(line)["samples_per_s"] for line in f if '"samples_per_s"' in line]
                    with open(os.path.join(out, "summary.json")) as f:
                        summary = json.load(f)
                    # the trainer logs samples/s every 10 steps; the first window includes warm-up
                    run["samples_per_s_per_window"] = rates
                    batch = summary["samples"] / summary["steps"]
                    run["s_per_step"] = round(batch / statistics.median(rates[1:] or rates), 2)
                    results["stage2"][setting].append(run)
                    shutil.rmtree(out, ignore_errors=True)
                if "pretrain" in a.jobs:
                    out = os.path.join(work, f"enc-{r}-{setting}.safetensors")
                    run = timed([sys.executable, "scripts/pretrain_synth_encoder.py", "--data", d, "--image-size", "256",
                                 "--objective", "reading", "--reading-images", "500", "--num-train", "2000",
                                 "--batch-size", "128", "--steps", str(a.pretrain_steps), "--seed", "1", "--lr", "5e-3",
                                 "--workers", "2", "--set", "init.vision.layer_scale_init_value=0.01", "--out", out], env)
                    with open(os.path.splitext(out)[0] + ".log.json") as f:
                        log = json.load(f)
                    run["train_wall_s"] = log["log"][-1]["seconds"]
                    run["s_per_step"] = round(log["log"][-1]["seconds"] / log["steps_run"], 2)
                    run["final_loss"] = log["log"][-1]["loss"]
                    results["pretrain"][setting].append(run)
                print(f"round {r + 1}/{a.rounds}, allocator tuning {setting}: "
                      + "; ".join(f"{job} {results[job][setting][-1]['s_per_step']} s/step, "
                                  f"sys {results[job][setting][-1]['sys_s']} s" for job in a.jobs), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {job: {s: {"s_per_step_median": statistics.median(x["s_per_step"] for x in runs),
                         "sys_s_median": statistics.median(x["sys_s"] for x in runs)}
                     for s, runs in res.items()} for job, res in results.items()}
    report = {"command": "python benchmarks/train_allocator_ab.py " + " ".join(sys.argv[1:]),
              "machine": {**machine_info(torch.device("cpu")), "threads": torch.get_num_threads(),
                          "python": platform.python_version()},
              "summary": summary, "runs": results}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

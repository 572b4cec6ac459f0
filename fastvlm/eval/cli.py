"""Evaluate a model on a benchmark file or a LLaVA-format file, resumably.

  fastvlm eval --task textvqa --data TextVQA_0.5.1_val.json --image-root train_images --out runs/textvqa
  fastvlm eval --model apple-fastvlm-0.5b --task pope --data pope/ --out runs/pope --batch-size 16
  fastvlm eval --task synth --data synth/test.json --out runs/synth --limit 200   # then rerun without --limit

Answers are greedy and short (--max-new-tokens, default per task). Predictions are
appended to OUT/predictions.jsonl after every batch: run the same command again after an
interruption and only the samples without a prediction are answered. At the end the
scores are printed and written with the run's details to OUT/summary.json (model,
resolution, device, dtype, and TTFT: per request of the batched run, and separately at
batch 1 on the first --ttft-samples samples, the setting the paper reports);
OUT/scores.jsonl holds the per-sample scores. One OUT folder holds one task.

Tasks (--task) and the files --data takes:
{tasks}
Images are looked up under --image-root when given, else the owner's layout next to the
file (named above), else the file's own folder. Image paths in records may be absolute.
Every image file is checked to exist before the model is loaded; one that PIL cannot read stops the
run at its batch with the record's id (the predictions written so far are kept: fix or remove the
record and run the same command again to resume). With --skip-bad every image is decoded before the
model loads and the records with unreadable images are left out, named, and counted in the summary.

Prompts follow LLaVA-1.5 / lmms-eval (the setting of FastVLM's published numbers):
"<question>\\nAnswer the question using a single word or phrase." for short answers,
lettered options + "Answer with the option's letter from the given choices directly."
for ScienceQA; the images come first, one <image> each, in the model's chat template.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from typing import Optional

from ..commands.common import add_model_args, int_arg
from .tasks import TASKS

_FORMATS = {
    "textvqa": "TextVQA_0.5.1_val.json: {'data': [{question_id, question, image_id, answers[10]}]}; "
    "images {image_id}.jpg in train_images/",
    "docvqa": "val_v1.0(_withQT).json: {'data': [{questionId, question, image, answers}]}; image paths "
    "relative to the file's folder",
    "chartqa": "test_human.json / test_augmented.json (or their folder): [{imgname, query, label}]; images in png/",
    "pope": "coco_pope_{random,popular,adversarial}.json (JSON lines of {question_id, image, text, label}) "
    "or a folder of them; images in val2014/",
    "gqa": "testdev_balanced_questions.json: {qid: {imageId, question, answer, types}}; images in images/",
    "scienceqa_img": "problems.json (+ pid_splits.json) or their folder; test split, image questions only; "
    "images in images/test/{pid}/",
    "llava": "JSON list or JSON lines: {id, image, conversations: [human, gpt, ...]} (last gpt turn = "
    "reference) or {id, image, question, answer|answers}",
    "jsonl": "same as llava",
    "synth": "`fastvlm data synth` output (OUT/test.json, or OUT itself for its test split): LLaVA records with "
             "question_type and text_size",
}


def _task_help() -> str:
    lines = []
    for name in sorted(TASKS):
        t = TASKS[name]
        head = textwrap.wrap(f"{t.description} (primary: {t.primary})", width=86 - 16)
        lines.append(f"  {name:<14}{head[0]}")
        lines += [" " * 16 + h for h in head[1:]]
        fmt = _FORMATS.get(name)
        if fmt:
            lines += textwrap.wrap("file: " + fmt, width=86, initial_indent=" " * 16, subsequent_indent=" " * 22)
    return "\n".join(lines)


__doc__ = __doc__.format(tasks=_task_help())


_positive_int = int_arg(1)
_non_negative_int = int_arg(0)


def add_arguments(p) -> None:
    add_model_args(p)
    g = p.add_argument_group("evaluation")
    g.add_argument("--task", "-t", required=True, choices=sorted(TASKS), metavar="TASK",
                   help=f"benchmark reader, prompt and metric: {', '.join(sorted(TASKS))} (see above)")
    g.add_argument("--data", "-d", required=True, help="the benchmark file (or folder, where the task allows)")
    g.add_argument("--image-root", default=None, help="folder the records' image paths are relative to")
    g.add_argument("--out", "-o", required=True,
                   help="output folder: predictions.jsonl (resume state), scores.jsonl, summary.json")
    g.add_argument("--batch-size", "-b", type=_positive_int, default=8,
                   help="samples per batched generate call (default 8)")
    g.add_argument("--limit", type=_positive_int, default=None,
                   help="evaluate only the first N samples, N >= 1 (default: all)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help="most answer tokens (default per task: " +
                        ", ".join(f"{k} {v}" for k, v in _default_tokens().items()) + ")")
    g.add_argument("--split", default=None, help="scienceqa_img only: the split to read (default test)")
    g.add_argument("--system", default=None,
                   help="system prompt (default: the checkpoint's, 'You are a helpful assistant.')")
    g.add_argument("--ttft-samples", type=_non_negative_int, default=5,
                   help="measure batch-1 TTFT on this many samples before the run (default 5; 0: skip)")
    g.add_argument("--skip-bad", action="store_true",
                   help="decode every image before the model loads and leave out the records whose images cannot "
                        "be read (named on stderr and in summary.json's skipped_bad_records) instead of stopping "
                        "at the first")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _default_tokens() -> dict:
    from .glue import DEFAULT_MAX_NEW_TOKENS

    return DEFAULT_MAX_NEW_TOKENS


def _write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def _ms(stat) -> str:
    if not stat:
        return "n/a"
    return f"median {stat['median'] * 1000:.1f} ms, mean {stat['mean'] * 1000:.1f} ms (n={stat['n']})"


def print_summary(summary: dict, out_dir: str, file=None) -> None:
    """The scores (x100, as papers print them), sample counts and TTFT of a summary."""
    file = file or sys.stdout
    task, primary = summary["task"], summary["primary_metric"]
    print(f"{task}: n={summary['n']} ({summary['n_predicted_this_run']} predicted this run, "
          f"{summary['n_resumed']} resumed) | model {summary.get('model')} | "
          f"{summary.get('resolution')}px | {summary.get('device')} {summary.get('dtype')}", file=file)
    scores = summary.get("scores") or {}
    width = max((len(k) for k in scores), default=8)
    for k, v in scores.items():
        mark = " *" if k == primary else ""
        if isinstance(v, int) and not isinstance(v, bool):
            print(f"  {k:<{width}}  {v:7d}{mark}", file=file)  # a count (POPE's tp/fp/tn/fn/n), not a score
        else:
            print(f"  {k:<{width}}  {100 * v:7.2f}{mark}", file=file)
    skipped = summary.get("skipped_bad_records")
    if skipped and skipped.get("count"):
        print(f"  left out: {skipped['count']} record(s) with unreadable images (--skip-bad; see summary.json)",
              file=file)
    t1 = summary.get("ttft_batch1")
    if t1:
        print(f"  TTFT batch 1: {_ms(t1['ttft_s'])}", file=file)
    tb = summary.get("ttft")
    if tb:
        print(f"  TTFT per request at batch {tb['batch_size']}: {_ms(tb['ttft_s'])}", file=file)
    print(f"  summary: {os.path.join(out_dir, 'summary.json')}", file=file)


def _data_file(task: str, data: str) -> str:
    """The data as run.json records it: a `data synth` folder is its test.json, so naming the folder or the file
    resumes the same run."""
    path = os.path.abspath(data)
    if task == "synth" and os.path.isfile(os.path.join(path, "test.json")):
        path = os.path.join(path, "test.json")
    return path


def _recorded_data(out) -> Optional[str]:
    """The data path a previous run in `out` recorded, if any."""
    from .runner import RUN_FILE

    try:
        with open(os.path.join(out, RUN_FILE), encoding="utf-8") as f:
            data = (json.load(f).get("settings") or {}).get("data")
    except (OSError, ValueError, AttributeError):
        return None
    return data if isinstance(data, str) else None


def run(args) -> int:
    import torch

    from .. import __version__
    from ..commands.common import load_model, model_path
    from ..errors import ConfigError, FastVLMError
    from .glue import TimingLog, default_max_new_tokens, make_predict_fn, measure_batch1_ttft, readable_samples
    from .runner import SUMMARY_FILE, check_run_file, evaluate
    from .tasks import get_task

    task = get_task(args.task)
    reader_kwargs = {}
    if args.split is not None:
        if task.name != "scienceqa_img":
            raise ConfigError(f"--split applies to scienceqa_img only, not {task.name}")
        reader_kwargs["split"] = args.split
    # Read and check everything before the (slow) model load.
    samples = task.load(args.data, args.image_root, limit=args.limit, check_images=True, **reader_kwargs)
    if not samples:
        raise FastVLMError(f"{args.data}: no samples to evaluate for task {task.name}")
    print(f"{task.name}: {len(samples)} samples from {args.data}", file=sys.stderr)
    check_run_file(args.out, task)  # another task's folder is refused before the (slow) model load
    skipped = None
    if args.skip_bad:
        samples, bad = readable_samples(samples, progress=not args.no_progress)
        skipped = {"count": len(bad), "examples": bad[:20]}
        for b in bad:
            print(f"skipping record {b['id']!r}: {b['error']}", file=sys.stderr)
        if not samples:
            raise FastVLMError(f"{args.data}: every sample has an unreadable image; nothing to evaluate")

    model = load_model(args)
    max_new_tokens = args.max_new_tokens or default_max_new_tokens(task.name)
    details = {
        "model": model_path(args),
        "resolution": int(model.config.image_size),
        "num_image_tokens": int(model.num_image_tokens),
        "device": str(model.device),
        "dtype": str(model.dtype).replace("torch.", ""),
        "attention": "eager" if getattr(args, "exact", False) else "sdpa",
        "data": _data_file(task.name, args.data),
        "image_root": os.path.abspath(args.image_root) if args.image_root else None,
        "decoding": {"greedy": True, "max_new_tokens": max_new_tokens},
        "system_prompt": args.system,
        "fastvlm_version": __version__,
        "torch_version": torch.__version__,
        "skipped_bad_records": skipped,
    }

    # what the predictions depend on: a resume into args.out with other settings is refused, here, before the
    # TTFT measurement, rather than after it
    settings = {k: details[k] for k in ("model", "resolution", "num_image_tokens", "dtype", "attention", "data",
                                        "image_root", "decoding", "system_prompt")}
    if os.path.isdir(settings["model"]):
        settings["model"] = os.path.abspath(settings["model"])
    # the weight files, not only their path: weights retrained or converted in place must not resume onto
    # predictions the old ones made
    if getattr(model, "checkpoint_path", None):
        from ..checkpoints.io import weights_signature

        settings["weights_files"] = weights_signature(model.checkpoint_path)
    recorded = _recorded_data(args.out)
    if recorded and recorded != settings["data"] and _data_file(task.name, recorded) == settings["data"]:
        settings["data"] = details["data"] = recorded  # a run recorded (before session 22) under its folder's name
    check_run_file(args.out, task, settings)

    ttft_batch1 = None
    if args.ttft_samples:
        print(f"measuring batch-1 TTFT on {min(args.ttft_samples, len(samples))} samples ...", file=sys.stderr)
        ttft_batch1 = measure_batch1_ttft(model, samples, n=args.ttft_samples, system_prompt=args.system)

    previous = None
    summary_path = os.path.join(args.out, SUMMARY_FILE)
    if os.path.isfile(summary_path):
        try:
            with open(summary_path, encoding="utf-8") as f:
                previous = json.load(f)
        except (OSError, json.JSONDecodeError):
            previous = None
    log = TimingLog()
    predict_fn = make_predict_fn(model, max_new_tokens=max_new_tokens, timing_log=log, system_prompt=args.system)
    summary = evaluate(
        task, samples, predict_fn, out_dir=args.out, batch_size=args.batch_size, limit=args.limit,
        progress=not args.no_progress, extra_summary={**details, "ttft_batch1": ttft_batch1}, settings=settings,
    )
    # Batched TTFT is known only once the run is over: add it and rewrite the summary. It covers the requests
    # predicted in this run; when everything was resumed, the previous run's figure is kept.
    summary["ttft"] = log.summary(args.batch_size)
    if summary["ttft"] is None and summary["n_predicted_this_run"] == 0 and isinstance(previous, dict):
        summary["ttft"] = previous.get("ttft")
    _write_json_atomic(os.path.join(args.out, SUMMARY_FILE), summary)
    print_summary(summary, args.out)
    return 0

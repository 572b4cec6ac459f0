"""Model-agnostic, resumable evaluation loop.

The model is reached only through ``predict_fn``::

    def predict_fn(batch: list[Sample]) -> list[str]:
        # one answer per sample, same order; sample.prompt is the text to send,
        # sample.images the image paths (one image token each, placed by the glue)
        ...

Predictions are appended to ``out_dir/predictions.jsonl`` (one JSON object per line:
``{"id", "prediction", "references"}``) and flushed after every batch, so a run that is
interrupted (error, Ctrl-C, lost machine) continues where it stopped when started again
with the same ``out_dir``: existing predictions are read back (a truncated last line is
dropped), their samples are skipped, and the scores at the end cover every sample.

Files written in ``out_dir``:

* ``predictions.jsonl``: grows during the run;
* ``run.json``: the task name, the time of the first start and the run's ``settings`` (what
  the predictions depend on: model, resolution, dtype, data, decoding, ...); a rerun for
  another task, or with other settings, in the same folder is refused, since it would mix
  two runs' predictions into one score;
* ``scores.jsonl``: per-sample prediction, references and scores, rewritten at the end;
* ``summary.json``: task, n, scores, breakdown, timings, and ``extra_summary``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Union

from ..errors import ConfigError, FastVLMError
from .tasks import Sample, Task, get_task

__all__ = ["PredictFn", "evaluate", "read_predictions", "score_predictions"]

PREDICTIONS_FILE = "predictions.jsonl"
SUMMARY_FILE = "summary.json"
SCORES_FILE = "scores.jsonl"
RUN_FILE = "run.json"


_SUMMARY_KEYS = (
    "task", "primary_metric", "n", "scores", "breakdown", "n_predicted_this_run", "n_resumed",
    "unused_predictions", "created_at", "run_started_at", "finished_at", "elapsed_s_this_run",
    "predict_s_this_run", "samples_per_s_this_run", "batch_size", "limit", "predictions_file",
    "scores_file",
)  # fmt: skip


class PredictFn(Protocol):
    """``predict_fn(batch) -> answers``: one string per sample of ``batch``, in order."""

    def __call__(self, batch: list[Sample]) -> list[str]: ...


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _parse_prediction(line: bytes, path: Path, lineno: int) -> tuple[str, str]:
    obj = json.loads(line.decode("utf-8"))
    if not isinstance(obj, dict) or not isinstance(obj.get("id"), str) or not isinstance(obj.get("prediction"), str):
        raise FastVLMError(f"{path}: line {lineno} is not a prediction record ({{'id': str, 'prediction': str}})")
    return obj["id"], obj["prediction"]


def _scan(path: Path) -> tuple[dict[str, str], int, bool]:
    """Predictions in ``path``; the byte length of its valid part; whether that part
    lacks a final newline. A last line without newline that does not parse (a write cut
    short) is left out of the valid part; any other bad line is an error."""
    data = path.read_bytes()
    preds: dict[str, str] = {}
    pos = 0
    lineno = 0
    while pos < len(data):
        lineno += 1
        nl = data.find(b"\n", pos)
        end = len(data) if nl == -1 else nl
        line = data[pos:end]
        if line.strip():
            try:
                pid, pred = _parse_prediction(line, path, lineno)
            except (json.JSONDecodeError, UnicodeDecodeError):
                if nl == -1:  # truncated tail: drop it
                    return preds, pos, False
                raise FastVLMError(f"{path}: line {lineno} is not valid JSON; fix or delete the file") from None
            preds[pid] = pred
        if nl == -1:
            return preds, len(data), True
        pos = nl + 1
    return preds, len(data), False


def read_predictions(path: Union[str, os.PathLike]) -> dict[str, str]:
    """``{sample id: prediction}`` from a predictions.jsonl (a truncated last line is
    ignored; a later line for the same id wins)."""
    p = Path(path)
    if not p.exists():
        return {}
    return _scan(p)[0]


def _open_for_append(path: Path) -> dict[str, str]:
    """Read existing predictions and leave the file ready to append whole lines."""
    if not path.exists():
        return {}
    preds, valid_len, needs_newline = _scan(path)
    size = path.stat().st_size
    if valid_len < size:
        os.truncate(path, valid_len)
    if needs_newline:
        with open(path, "ab") as f:
            f.write(b"\n")
    return preds


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def check_run_file(out: Union[str, os.PathLike], task: Union[str, Task], settings: Optional[dict] = None) -> str:
    """Refuse an output folder that holds another task's run, or predictions made with other
    ``settings``; record the task and settings for the first run. Returns the first start's time."""
    out, task = Path(out), get_task(task)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory; give a folder for the predictions")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--out {out}: {parent} is a file, so the folder cannot be created")
            break
    run_file = out / RUN_FILE
    meta: Any = {}
    if run_file.exists():
        try:
            meta = json.loads(run_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            meta = {}
    if not isinstance(meta, dict):
        meta = {}
    if meta.get("task") not in (None, task.name):
        raise ConfigError(
            f"{out} holds a run of task {meta['task']!r}; use another output folder (--out) for {task.name!r}"
        )
    old = meta.get("settings")
    if settings is not None and isinstance(old, dict):
        diffs = [f"{k}: {old[k]!r} then, {settings[k]!r} now" for k in sorted(set(old) & set(settings))
                 if old[k] != settings[k]]
        if diffs:
            raise ConfigError(
                f"{out} holds predictions made with other settings ({'; '.join(diffs)}); resuming would score "
                "them as this run's. Use another output folder (--out), or delete this one to start over"
            )
    created = meta["created_at"] if isinstance(meta.get("created_at"), str) else _now()
    if settings is not None and isinstance(old, dict) and set(settings) - set(old):
        # a folder from before some settings were recorded: add them, so the next resume checks them too
        settings = {**old, **settings}
        old = None
    if not run_file.exists() or (settings is not None and old is None):
        # the first run, or a folder from before (some) settings were recorded: record them now
        out.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(run_file, {"task": task.name, "created_at": created,
                                      **({"settings": settings} if settings is not None else {})})
    return created


def score_predictions(
    task: Union[str, Task], samples: Iterable[Sample], predictions: dict[str, str]
) -> dict:
    """Score ``predictions`` (``{id: answer}``, e.g. from :func:`read_predictions`)
    on ``samples``; every sample needs a prediction. Returns ``{"scores", "breakdown",
    "per_sample"}`` as :meth:`Task.score`."""
    task = get_task(task)
    samples = list(samples)
    missing = [s.id for s in samples if s.id not in predictions]
    if missing:
        raise FastVLMError(f"{task.name}: {len(missing)} samples have no prediction, e.g. {missing[:3]}")
    return task.score(samples, [predictions[s.id] for s in samples])


def evaluate(
    task: Union[str, Task],
    samples: Iterable[Sample],
    predict_fn: Callable[[list[Sample]], list[str]],
    *,
    out_dir: Union[str, os.PathLike],
    batch_size: int = 8,
    limit: Optional[int] = None,
    progress: bool = True,
    extra_summary: Optional[dict[str, Any]] = None,
    settings: Optional[dict[str, Any]] = None,
) -> dict:
    """Run ``predict_fn`` over the samples not yet predicted in ``out_dir``, then score
    all of them and write ``summary.json``; returns the summary.

    task: a :data:`TASKS` name or a :class:`Task`.
    samples: e.g. ``TASKS[name].load(path)``; ids must be unique.
    limit: evaluate only the first ``limit`` samples.
    extra_summary: merged into the summary (model, resolution, TTFT, ...); its keys
        must not clash with the summary's own.
    settings: what the predictions depend on (JSON values), kept in ``run.json``; resuming
        in a folder whose recorded settings differ is refused (:func:`check_run_file`).
    """
    task = get_task(task)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    samples = list(samples)
    if limit is not None:
        samples = samples[: max(0, limit)]
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise FastVLMError(f"{task.name}: duplicate sample id {dup!r}; ids are the resume keys and must be unique")

    clash = sorted(set(extra_summary or {}) & set(_SUMMARY_KEYS))
    if clash:
        raise ConfigError(f"extra_summary keys clash with the summary's own: {clash}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    created_at = check_run_file(out, task, settings)
    run_started_at = _now()
    t0 = time.perf_counter()

    pred_path = out / PREDICTIONS_FILE
    done = _open_for_append(pred_path)
    wanted = set(ids)
    unused = sum(1 for k in done if k not in wanted)
    pending = [s for s in samples if s.id not in done]
    n_resumed = len(samples) - len(pending)

    predict_s = 0.0
    from tqdm.auto import tqdm

    with open(pred_path, "a", encoding="utf-8") as f, tqdm(
        total=len(samples), initial=n_resumed, disable=not progress, desc=f"eval {task.name}", unit="sample"
    ) as bar:
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            t = time.perf_counter()
            answers = predict_fn(batch)
            predict_s += time.perf_counter() - t
            if not isinstance(answers, (list, tuple)) or len(answers) != len(batch):
                got = len(answers) if isinstance(answers, (list, tuple)) else type(answers).__name__
                raise FastVLMError(f"predict_fn returned {got} answers for a batch of {len(batch)}")
            lines = []
            for s, a in zip(batch, answers):
                if not isinstance(a, str):
                    raise FastVLMError(f"predict_fn returned a {type(a).__name__} for sample {s.id!r}, expected str")
                lines.append(json.dumps({"id": s.id, "prediction": a, "references": s.references}, ensure_ascii=False))
            f.write("\n".join(lines) + "\n")
            f.flush()
            for s, a in zip(batch, answers):
                done[s.id] = a
            bar.update(len(batch))

    predictions = [done[s.id] for s in samples]
    result = task.score(samples, predictions)

    tmp = out / (SCORES_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for s, p, sc in zip(samples, predictions, result["per_sample"]):
            record = {"id": s.id, "prediction": p, "references": s.references, **sc}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, out / SCORES_FILE)

    elapsed = time.perf_counter() - t0
    n_new = len(pending)
    summary: dict[str, Any] = {
        "task": task.name,
        "primary_metric": task.primary,
        "n": len(samples),
        "scores": result["scores"],
        "breakdown": result["breakdown"],
        "n_predicted_this_run": n_new,
        "n_resumed": n_resumed,
        "unused_predictions": unused,
        "created_at": created_at,
        "run_started_at": run_started_at,
        "finished_at": _now(),
        "elapsed_s_this_run": round(elapsed, 3),
        "predict_s_this_run": round(predict_s, 3),
        "samples_per_s_this_run": round(n_new / predict_s, 3) if predict_s > 0 else None,
        "batch_size": batch_size,
        "limit": limit,
        "predictions_file": PREDICTIONS_FILE,
        "scores_file": SCORES_FILE,
    }
    assert set(summary) == set(_SUMMARY_KEYS)
    summary.update(extra_summary or {})
    _write_json_atomic(out / SUMMARY_FILE, summary)
    return summary

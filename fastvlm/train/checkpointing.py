"""Training checkpoints that lose nothing, written atomically.

A checkpoint is a directory ``step_N/`` holding

    model.safetensors     the weights (all of them, or only the trainable ones plus buffers)
    optimizer.pt          the optimizer state dict (torch.save of tensors and plain values)
    scheduler.pt          the learning-rate scheduler state dict
    scaler.pt             the fp16 gradient scaler's state (fp16 mixed precision only)
    rng_state_R.pt        Python, NumPy and torch (CPU and this process's CUDA device) RNG states of process R
    trainer_state.json    step, epoch, position in the epoch, sampler state, counters

It is written to ``step_N.tmp/``, every file is fsynced, ``trainer_state.json`` is written
last, and the directory is renamed to ``step_N/`` (then the parent is fsynced), so a
``step_N/`` directory is always complete: a crash leaves at most a ``.tmp`` directory,
which the next run deletes. Every ``.pt`` file is read back with
``torch.load(weights_only=True)``: only tensors and plain Python values, never pickled
objects.

Multi-process runs write into the same directory, so the output directory must be on a
filesystem every process sees (as with any multi-node training).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any, Optional

import numpy as np
import torch

from ..errors import EARLIER_STEP_HINT, CheckpointError

STEP_RE = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
SCALER_FILE = "scaler.pt"


def rng_file(rank: int) -> str:
    return f"rng_state_{rank}.pt"


# ---------------------------------------------------------------------------------------
# Finding and rotating
# ---------------------------------------------------------------------------------------


def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in out_dir as (step, path), oldest first."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for name in os.listdir(out_dir):
        m = STEP_RE.match(name)
        path = os.path.join(out_dir, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(out_dir: str) -> Optional[str]:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def remove_stale(out_dir: str) -> list[str]:
    """Delete ``step_N.tmp`` directories left by a run that died while saving."""
    removed = []
    if os.path.isdir(out_dir):
        for name in os.listdir(out_dir):
            if name.startswith("step_") and name.endswith(".tmp"):
                shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
                removed.append(name)
    return removed


def rotate(out_dir: str, keep_last: int) -> list[str]:
    """Keep the newest ``keep_last`` complete checkpoints, delete older ones."""
    found = list_checkpoints(out_dir)
    removed = []
    for _, path in found[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


# ---------------------------------------------------------------------------------------
# RNG
# ---------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """RNG states as tensors and plain values (loadable with weights_only=True)."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's device only: reading every device's state would create a CUDA
        # context on each GPU from each process
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some filesystems do not support fsync on directories
        pass


def fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            _fsync_file(os.path.join(root, f))
        fsync_dir(root)


def save_torch(obj: Any, path: str) -> None:
    torch.save(obj, path)


def load_torch(path: str) -> Any:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read {path} (weights_only=True): {type(e).__name__}: {e}; if the checkpoint "
                              f"is damaged, {EARLIER_STEP_HINT}") from None


def write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def read_state(path: str) -> dict:
    state_path = os.path.join(path, STATE_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"no such checkpoint: {path}")
    if not os.path.isfile(state_path):
        steps = list_checkpoints(path)
        hint = (f"; it is a run's output directory: give one of its step folders ({os.path.basename(steps[-1][1])}"
                " is the latest), or --resume auto with that --output-dir") if steps else ""
        raise CheckpointError(f"{path} is not a complete training checkpoint (no {STATE_FILE}){hint}")
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{state_path} is not valid JSON ({e}); the checkpoint is damaged: "
                              f"{EARLIER_STEP_HINT}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {state_path}: {e.strerror or e}") from None
    problem = state_problem(state)
    if problem:
        raise CheckpointError(f"{state_path}: {problem}; the checkpoint is damaged: {EARLIER_STEP_HINT}")
    return state


def state_problem(state: Any) -> Optional[str]:
    """What is wrong with a trainer_state.json's content, or None."""
    if not isinstance(state, dict):
        return f"expected a JSON object, got {type(state).__name__}"
    for key in ("step", "epoch", "step_in_epoch", "samples_seen"):
        v = state.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            return f"{key} must be a non-negative integer, got {v!r}"
    if not isinstance(state.get("sampler"), dict):
        return f"sampler must be a JSON object (the data order), got {state.get('sampler')!r}"
    return None


def begin(out_dir: str, step: int) -> str:
    """Create a fresh ``step_N.tmp`` directory (call on the main process only)."""
    tmp = os.path.join(out_dir, f"step_{step}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def commit(out_dir: str, step: int, state: dict) -> str:
    """Write trainer_state.json, fsync everything and rename ``step_N.tmp`` to ``step_N``."""
    tmp = os.path.join(out_dir, f"step_{step}.tmp")
    final = os.path.join(out_dir, f"step_{step}")
    write_json(os.path.join(tmp, STATE_FILE), state)
    fsync_tree(tmp)
    if os.path.exists(final):  # a checkpoint of the same step from an earlier attempt
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(out_dir)
    return final


__all__ = [
    "OPTIMIZER_FILE", "SCALER_FILE", "SCHEDULER_FILE", "STATE_FILE", "WEIGHTS_FILE", "begin", "capture_rng", "commit",
    "fsync_dir", "latest_checkpoint", "list_checkpoints", "load_torch", "read_state", "remove_stale",
    "restore_rng", "rng_file", "rotate", "save_torch", "write_json",
]

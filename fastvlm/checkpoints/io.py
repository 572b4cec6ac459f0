"""Reading and writing weights: safetensors only, single files or shards with an index.

Pickle-based files (`.bin`, `.pt`, `.pth`, `.ckpt`) are never unpickled: a checkpoint
that only has those is refused with a message that says how to convert it.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Optional

import torch

from ..errors import EARLIER_STEP_HINT, CheckpointError

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def safetensors_files(directory: str) -> list[str]:
    """The safetensors files that make up the checkpoint in `directory`, in load order."""
    index_path = os.path.join(directory, SAFE_INDEX)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                index = json.load(f)
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path} is not a valid safetensors index ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: weight_map must be a non-empty mapping of tensor names to shard "
                                  f"files, got {type(weight_map).__name__} {str(weight_map)[:60]}")
        bad = sorted({str(f) for f in weight_map.values()
                      if not isinstance(f, str) or os.path.basename(f) != f or f in ("", ".", "..")})
        if bad:
            raise CheckpointError(f"{index_path}: shard names must be file names in its folder, got {', '.join(bad[:3])}")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
        if missing:
            raise CheckpointError(f"{index_path} names shard(s) that do not exist: {', '.join(missing)}")
        return [os.path.join(directory, f) for f in files]
    single = os.path.join(directory, SAFE_SINGLE)
    if os.path.isfile(single):
        return [single]
    others = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if others:
        paths = [os.path.join(directory, f) for f in others]
        # a FIFO would block the read for ever; a directory, a device or a looping link cannot be weights either
        odd = [p for p in paths if not os.path.isfile(p)]
        if odd:
            raise CheckpointError(f"{odd[0]} is not a regular file ({_file_kind(odd[0])}), so it cannot hold weights")
        return paths
    pickles = sorted(f for f in os.listdir(directory) if f.endswith(PICKLE_SUFFIXES))
    if os.path.isfile(os.path.join(directory, "trainer_state.json")):  # its .pt files are the trainer's own state
        raise CheckpointError(f"{directory} is a training checkpoint without its weights ({SAFE_SINGLE} is missing); "
                              f"it is damaged: {EARLIER_STEP_HINT}")
    if pickles:
        raise CheckpointError(
            f"{directory} holds only pickle weights ({', '.join(pickles[:3])}); fastvlm never unpickles files "
            "because they can run arbitrary code. Convert them to safetensors in a trusted environment "
            "(e.g. safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors'))."
        )
    raise CheckpointError(f"no model weights (*.safetensors) in {directory}")


def _file_kind(path: str) -> str:
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return f"it cannot be opened: {e.strerror or e}"
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a plain file"


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None


def load_state_dict(directory: str, *, device: str | torch.device = "cpu", progress: bool = True) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint in `directory`, read with safetensors (no pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    files = safetensors_files(directory)
    state: dict[str, torch.Tensor] = {}
    bar = None
    sizes = {f: _size(f) for f in files}
    if progress and (len(files) > 1 or sizes[files[0]] > 200 * 2**20):
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True,
                   desc="loading weights", leave=False)
    try:
        for path in files:
            try:
                with safe_open(path, framework="pt", device=str(device)) as f:
                    for key in f.keys():
                        if key in state:
                            raise CheckpointError(f"tensor {key!r} appears in more than one shard ({path})")
                        state[key] = f.get_tensor(key)
            except SafetensorError as e:
                raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
            except OSError as e:
                raise CheckpointError(f"cannot read {path}: {e}") from None
            if bar is not None:
                bar.update(sizes[path])
    finally:
        if bar is not None:
            bar.close()
    return state


def weights_signature(directory: str) -> str:
    """A short hash of the names, sizes and modification times of the checkpoint's safetensors files: weights
    rewritten in place (retrained, converted) get a new one, at no cost (no byte is read; a 7B checkpoint's
    SHA-256 would take seconds at every start). Links are followed, as loading follows them."""
    import hashlib

    h = hashlib.sha256()
    for path in safetensors_files(directory):
        try:
            st = os.stat(path)
        except OSError as e:
            raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
        h.update(f"{os.path.basename(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def tensor_dtypes(directory: str) -> dict[str, str]:
    """Each tensor's safetensors dtype ("BF16", "F32", "I64", ...) from the files' headers, reading no weights."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    out: dict[str, str] = {}
    for path in safetensors_files(directory):
        try:
            with safe_open(path, framework="pt") as f:
                out.update({key: f.get_slice(key).get_dtype() for key in f.keys()})
        except SafetensorError as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    return out


def float_dtype(name: str) -> Optional[torch.dtype]:
    """The torch dtype of a safetensors floating-point dtype name, else None."""
    return _FLOAT_DTYPES.get(name)


def _dedupe_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage; store a contiguous copy of each."""
    seen: dict[tuple, str] = {}
    out = {}
    for k, t in state.items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key in seen or not t.is_contiguous():
            t = t.contiguous().clone()
        seen[key] = k
        out[k] = t.cpu() if t.device.type != "cpu" else t
    return out


def save_state_dict(
    state: dict[str, torch.Tensor],
    directory: str,
    *,
    max_shard_bytes: Optional[int] = None,
    metadata: Optional[dict[str, str]] = None,
) -> list[str]:
    """Write `state` as model.safetensors, or as shards plus an index when it exceeds max_shard_bytes.

    Files are written to a temporary name and renamed, so a crash never leaves a
    half-written file under the final name.
    """
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    state = _dedupe_shared(state)
    metadata = {"format": "pt", **(metadata or {})}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in state:
        nbytes = state[k].numel() * state[k].element_size()
        if max_shard_bytes and size + nbytes > max_shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][k] = state[k]
        size += nbytes
    # remove stale files of the other form so loading cannot mix old and new weights
    for f in os.listdir(directory):
        if f.endswith(".safetensors") or f == SAFE_INDEX:
            os.remove(os.path.join(directory, f))
    written = []
    if len(shards) == 1:
        names = [SAFE_SINGLE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        path = os.path.join(directory, name)
        save_file(shard, path + ".tmp", metadata=metadata)
        # safetensors creates its file owner-only (0600); give it the mode any other file gets (0644 under
        # the usual umask), as config.json and the tokenizer files beside it have
        os.chmod(path + ".tmp", 0o666 & ~_umask())
        os.replace(path + ".tmp", path)
        written.append(path)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
            "weight_map": {k: name for name, shard in zip(names, shards) for k in shard},
        }
        atomic_write_json(os.path.join(directory, SAFE_INDEX), index)
    return written


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str, text: str) -> None:
    """Write to a temporary name, then rename: a crash never leaves a half-written file under `path`."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def check_keys(
    expected: dict[str, tuple], got: dict[str, torch.Tensor], *, source: str, ignore: Iterable[str] = (),
    floating: Iterable[str] = (),
) -> None:
    """Raise one CheckpointError that names every missing, unexpected and mis-shaped tensor, and every tensor
    of `floating` (the model's weights) that the checkpoint holds as integers or booleans."""
    ignore = set(ignore)
    missing = sorted(k for k in expected if k not in got and k not in ignore)
    unexpected = sorted(k for k in got if k not in expected and k not in ignore)
    bad_shape = sorted(
        f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(expected[k])}"
        for k in expected
        if k in got and tuple(got[k].shape) != tuple(expected[k])
    )
    bad_dtype = sorted(f"{k}: {str(got[k].dtype).replace('torch.', '')}" for k in floating
                       if k in got and not (got[k].is_floating_point() or got[k].is_complex()))
    if not (missing or unexpected or bad_shape or bad_dtype):
        return
    parts = [f"checkpoint {source} does not match the model:"]

    def show(title, items):
        if items:
            more = f" (+{len(items) - 10} more)" if len(items) > 10 else ""
            parts.append(f"  {title} ({len(items)}): " + ", ".join(items[:10]) + more)

    show("missing tensors", missing)
    show("unexpected tensors", unexpected)
    show("wrong shapes", bad_shape)
    show("not floating-point (weights must be)", bad_dtype)
    raise CheckpointError("\n".join(parts))

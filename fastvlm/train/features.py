"""Encode each training image once when the encoder is frozen (``data.cache_image_features``).

With a frozen vision tower in eval mode, an image's encoder output is the same at every
epoch, so the encoder forward can run once per distinct image instead of once per sample
and epoch. The cache holds the encoder's output *before* the projector, so the projector
(which trains) sees exactly what it would see without the cache. On the small synthetic
model this turns a run bound by image decoding and the encoder into one bound by the LM.

Everything lives in memory, per process: images x tokens x channels x 4 bytes (the bundled
model's data: 20,500 images x 4 tokens x 512 channels = 0.16 GiB at 128 px, 0.63 GiB at
256 px). Each process of a distributed run encodes every image (the cache is built before
the model is wrapped).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence

import torch

from ..errors import ConfigError, ImageError
from .data import ConversationDataset, DataError

logger = logging.getLogger("fastvlm.train")


def _available_memory_bytes() -> Optional[int]:
    try:
        import psutil  # a dependency of accelerate
    except ImportError:  # pragma: no cover
        return None
    return int(psutil.virtual_memory().available)


class FeatureCache:
    """Encoder features [images, tokens, channels] (float32, CPU) and the row of each image path.

    ``failed`` maps the paths that could not be loaded (only under ``skip_bad``) to the error.
    """

    def __init__(self, features: torch.Tensor, rows: dict[str, int], failed: dict[str, str],
                 seconds: float = 0.0) -> None:
        self.features = features
        self.rows = rows
        self.failed = failed
        self.seconds = seconds  # how long building it took (decoding and encoding every image)

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def build(cls, vlm, datasets: Sequence[ConversationDataset], *, batch_size: int,
              autocast: Optional[Callable[[], Any]] = None, progress: bool = False,
              workers: int = 0, first_use: Optional[dict] = None) -> "FeatureCache":
        """``workers`` > 1 decodes and preprocesses the images in that many threads (PIL releases the GIL
        while it decodes and resizes), in the same order as one thread: the same features in the same rows.
        ``first_use``: `first_uses(datasets)` when the caller has it already (it reads every record)."""
        from .data import load_training_image

        if vlm.vision_tower.training or any(p.requires_grad for p in vlm.vision_tower.parameters()):
            raise ConfigError("data.cache_image_features needs a frozen encoder in eval mode")
        first_use = first_uses(datasets) if first_use is None else first_use
        paths = list(first_use)
        if not paths:
            return cls(torch.zeros(0), {}, {})
        tokens, channels = datasets[0].num_image_tokens, vlm.config.vision.out_channels
        need = len(paths) * tokens * channels * 4
        avail = _available_memory_bytes()
        if avail is not None and need > 0.8 * avail:
            raise ConfigError(
                f"data.cache_image_features: {len(paths)} images x {tokens} tokens x {channels} channels need "
                f"{need / 2**30:.1f} GiB, more than 80% of the {avail / 2**30:.1f} GiB available; "
                "turn the cache off for this dataset")

        ref = datasets[0]
        features = torch.empty(len(paths), tokens, channels, dtype=torch.float32)
        rows: dict[str, int] = {}
        failed: dict[str, str] = {}
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(paths), desc="caching image features", unit="img", leave=False)

        def load(p: str):
            try:
                return load_training_image(p, ref.image_size, ref.image_aspect_ratio)
            except ImageError as e:
                return e

        pool = ThreadPoolExecutor(workers) if workers > 1 else None
        t0 = time.time()
        n = 0
        try:
            for start in range(0, len(paths), batch_size):
                chunk, pixels = [], []
                batch = paths[start:start + batch_size]
                for p, x in zip(batch, pool.map(load, batch) if pool is not None else map(load, batch)):
                    if not isinstance(x, ImageError):
                        pixels.append(x)
                        chunk.append(p)
                    else:
                        ds, i = first_use[p]
                        msg = f"{ds.describe(i)}: {x}"
                        if not ds.skip_bad:
                            raise DataError(msg, "unreadable_image") from None
                        logger.warning("image failed to load; its samples are skipped: %s", msg)
                        failed[p] = msg
                if chunk:
                    with torch.no_grad(), (autocast() if autocast is not None else contextlib.nullcontext()):
                        out = vlm.encode_images(torch.stack(pixels))
                    features[n:n + len(chunk)] = out.float().cpu()
                    for p in chunk:
                        rows[p] = n
                        n += 1
                if bar is not None:
                    bar.update(len(batch))
        finally:
            if pool is not None:
                pool.shutdown()
        if bar is not None:
            bar.close()
        seconds = time.time() - t0
        logger.info("cached encoder features of %d images (%.2f GiB) in %.1f s", n, n * tokens * channels * 4 / 2**30,
                    seconds)
        return cls(features[:n].clone() if n < len(paths) else features, rows, failed, seconds)


    # ------------------------------------------------------------------ on disk (data.feature_cache_dir)
    def save(self, path: str, key: str) -> None:
        """Write the cache atomically (temporary file, then rename) as safetensors; `key` is `cache_key`'s."""
        from safetensors.torch import save_file

        order = sorted(self.rows, key=self.rows.get)
        meta = {"format": "pt", "key": key, "paths": json.dumps(order), "failed": json.dumps(self.failed),
                "seconds": str(self.seconds)}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            save_file({"features": self.features[:len(order)].contiguous()}, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str, key: str) -> "FeatureCache":
        """The cache `save` wrote under the same `key`; DataError if the file is not that."""
        from safetensors import safe_open

        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
                features = f.get_tensor("features")
            paths = json.loads(meta["paths"])
            failed = json.loads(meta["failed"])
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file
            raise DataError(f"{path} is not a readable feature cache ({type(e).__name__}: {e})") from None
        if meta.get("key") != key:
            raise DataError(f"{path} holds features of another encoder, image set or settings")
        if features.shape[0] != len(paths):
            raise DataError(f"{path}: {features.shape[0]} feature rows for {len(paths)} images")
        return cls(features, {p: i for i, p in enumerate(paths)}, failed, float(meta.get("seconds", 0.0)))


def first_uses(datasets: Sequence[ConversationDataset]) -> dict[str, tuple[ConversationDataset, int]]:
    """Each distinct image path of the datasets, in order of first use, with the sample that first uses it."""
    first_use: dict[str, tuple[ConversationDataset, int]] = {}
    for ds in datasets:
        for i in range(len(ds)):
            for p in ds.image_paths(i):
                first_use.setdefault(p, (ds, i))
    return first_use


def cache_key(vlm, datasets: Sequence[ConversationDataset], precision: str, paths: Sequence[str]) -> str:
    """What the cached features depend on, hashed: the encoder's weights, the preprocessing (resolution, aspect
    handling), the precision they were computed in, whether failed images may be skipped, and every image file
    (path, size and modification time; ``paths`` is `first_uses(datasets)`'s keys)."""
    h = hashlib.sha256()
    for name, t in sorted(vlm.vision_tower.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    ref = datasets[0]
    # with skip_bad a cache may hold failed images, which a run without it must not skip silently
    skip_bad = any(d.skip_bad for d in datasets)
    h.update(f"|{ref.image_size}|{ref.image_aspect_ratio}|{precision}|{ref.num_image_tokens}|{skip_bad}".encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"|{p}|{st.st_size}|{st.st_mtime_ns}".encode())
        except OSError:
            h.update(f"|{p}|missing".encode())
    return h.hexdigest()


class CachedFeatureDataset:
    """A ConversationDataset whose samples carry cached ``image_features`` instead of pixels.

    Batching attributes (``lengths``, ``has_images``, ...) are the wrapped dataset's.
    """

    def __init__(self, base: ConversationDataset, cache: FeatureCache) -> None:
        self.base = base
        self.cache = cache

    def __getattr__(self, name: str):
        if name in ("base", "cache"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        conv, tok = self.base.load_tokens(i)
        feats = None
        if conv.images:
            bad = [p for p in conv.images if p not in self.cache.rows]
            if bad:
                msg = self.cache.failed.get(bad[0]) or f"{self.base.describe(i)}: image {bad[0]} is not in the cache"
                return {"skipped": msg, "index": i}
            feats = self.cache.features[[self.cache.rows[p] for p in conv.images]]
        return {"input_ids": tok.input_ids, "labels": tok.labels, "pixel_values": None, "image_features": feats,
                "id": conv.id, "index": i}


__all__ = ["CachedFeatureDataset", "FeatureCache", "cache_key", "first_uses"]

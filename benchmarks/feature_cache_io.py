#!/usr/bin/env python
"""How long writing and loading an on-disk feature cache (data.feature_cache_dir) takes at a given size.

  python benchmarks/feature_cache_io.py --images 32614 --tokens 16 --channels 512 \\
      --out benchmarks/results/feature-cache-io.json

The features are random (the time does not depend on their values); the paths are synthetic. The file goes to a
temporary folder (or --dir) and is removed afterwards. Loading is timed after the write, so the file may still be in
the page cache: a first read from a cold disk can be slower.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=32614)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--channels", type=int, default=512)
    p.add_argument("--dir", default=None, help="where to write the file (default a temporary folder)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import torch

    from fastvlm.bench.report import write_json
    from fastvlm.train.features import FeatureCache

    features = torch.randn(args.images, args.tokens, args.channels)
    rows = {f"images/{i:06d}.png": i for i in range(args.images)}
    cache = FeatureCache(features, rows, {}, 0.0)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = os.path.join(d, "features.safetensors")
        t = time.perf_counter()
        cache.save(path, "key")
        write_s = time.perf_counter() - t
        size = os.path.getsize(path)
        t = time.perf_counter()
        loaded = FeatureCache.load(path, "key")
        load_s = time.perf_counter() - t
        float(loaded.features.sum())  # every value read (safetensors may map the file and read it lazily)
        read_s = time.perf_counter() - t
        assert torch.equal(loaded.features, features) and loaded.rows == rows
    out = {"images": args.images, "tokens": args.tokens, "channels": args.channels, "file_gb": round(size / 1e9, 3),
           "write_s": round(write_s, 2), "load_s": round(load_s, 2),
           "load_and_read_all_s": round(read_s, 2), "machine": platform.processor() or platform.machine(),
           "torch": torch.__version__, "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])}
    write_json(out, args.out)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

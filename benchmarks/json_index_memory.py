#!/usr/bin/env python
"""Memory a training data file costs: `json.load` (Python objects) against the index the trainer keeps.

  python benchmarks/json_index_memory.py runs/bundled/data/extra-train-bind.json \\
      --out benchmarks/results/json-index-memory.json

Python's tracemalloc counts the bytes each approach still holds after loading and its peak while loading.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def measure(fn):
    tracemalloc.start()
    t = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, {"held_mb": round(held / 1e6, 1), "peak_mb": round(peak / 1e6, 1), "seconds": round(seconds, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a JSON list of records")
    p.add_argument("--out", required=True, help="output JSON")
    args = p.parse_args(argv)

    from fastvlm.bench.report import write_json
    from fastvlm.train.data import _index_json_list

    def load():
        with open(args.path, encoding="utf-8") as f:
            return json.load(f)

    records, loaded = measure(load)
    n = len(records)
    del records
    (buffer, offsets), indexed = measure(lambda: _index_json_list(args.path))
    assert len(offsets) - 1 == n
    out = {"file": args.path, "file_mb": round(os.path.getsize(args.path) / 1e6, 1), "records": n,
           "json_load": loaded, "index": indexed, "machine": platform.processor() or platform.machine(),
           "python": platform.python_version(), "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])}
    write_json(out, args.out)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Copy a LLaVA-format split with every record's image path(s) prefixed, so a split written inside a subfolder
(e.g. DATA/extra/train.json from `fastvlm data synth --out DATA/extra`) reads its images from DATA.

  python scripts/prefix_image_paths.py DATA/extra/train.json DATA/extra-train.json --prefix extra/
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="the split to read (a JSON list of records)")
    ap.add_argument("dst", help="where to write the copy")
    ap.add_argument("--prefix", required=True, help="prepended to each image path, e.g. extra/")
    a = ap.parse_args(argv)
    with open(a.src, encoding="utf-8") as f:
        records = json.load(f)
    if not isinstance(records, list):
        ap.error(f"{a.src}: expected a JSON list of records")
    for r in records:
        if isinstance(r.get("image"), list):
            r["image"] = [a.prefix + p for p in r["image"]]
        elif "image" in r:
            r["image"] = a.prefix + r["image"]
    with open(a.dst, "w", encoding="utf-8") as f:
        f.write(json.dumps(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())

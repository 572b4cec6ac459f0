#!/usr/bin/env python
"""Regenerate examples/ (the images the README's first command asks about).

Each image is the first sample of its question type from a seed and split the bundled model
never trained on (seed 777, "test"), at the bundled model's data level and size, so the
README's answers can be checked against the scene's ground truth in examples/README.md.

  python scripts/make_examples.py            # writes examples/*.png and examples/README.md
  python scripts/make_examples.py --out DIR  # the same files into DIR
"""

from __future__ import annotations

import os

from fastvlm.data.synth import generate_sample

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "examples")
SEED, SPLIT, SIZE, LEVEL = 777, "test", 256, "basic"
WANTED = {"count": "shapes.png", "read_word": "word.png", "read_number": "number.png", "color": "colors.png",
          "position": "position.png"}


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=OUT, help="output directory (default: the repository's examples/)")
    out = p.parse_args().out
    os.makedirs(out, exist_ok=True)
    rows, found = [], {}
    for i in range(200):
        img, rec = generate_sample(SEED, SPLIT, i, SIZE, level=LEVEL)
        q = rec["qa"][0]
        if q["question_type"] in WANTED and q["question_type"] not in found:
            found[q["question_type"]] = (i, img, q)
        if len(found) == len(WANTED):
            break
    for qtype, name in WANTED.items():
        i, img, q = found[qtype]
        img.save(os.path.join(out, name))
        rows.append(f"| {name} | {q['question']} | {q['answer']} | {i} |")
    text = ("# Example images\n\n"
            f"Made by `python scripts/make_examples.py`: the first sample of each question type from "
            f"`fastvlm.data.synth.generate_sample({SEED}, '{SPLIT}', i, image_size={SIZE}, level='{LEVEL}')`, "
            "a seed and split the bundled model never saw in training.\n\n"
            "| file | question | true answer | sample i |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()

"""Generate the synthetic, text-rich visual question answering dataset (LLaVA format).

Each image is a pale background with up to six coloured shapes (circle, square, triangle, star,
diamond; red, green, blue, yellow, purple, orange, black) and a few words and 2-4 digit numbers
rendered at font sizes from 6 to 40 pixels (at --image-size 512; scaled with the size), so the
smallest text is only legible at high resolution. Each record asks one question -- sometimes a
second, multi-turn one -- with a short canonical answer that is correct by construction:

  count        How many circles are there?                  -> 3
  color        What color is the square?                    -> red
  shape        What shape is the green object?              -> triangle
  position     Is the red circle left or right of the ...?  -> left   (or above / below)
  exists       Is there a yellow star?                      -> yes
  read_word    What word is written in the image?           -> apple
  read_number  What is the number written in blue?          -> 4817

The question types are balanced. Reading questions store the target's font size as
"text_size", so accuracy can be broken down by text size and input resolution.

--level basic makes the same task family learnable by a model of a few million parameters
trained from scratch in about an hour of CPU (what the bundled model is trained on): up to
four shapes, at most one distractor text, 24 words, two-digit numbers, text from 12 px (at
512). --train-turns K asks up to K questions (one per type) about each training image.

Output (image paths in the JSON are relative to OUT):
  OUT/images/{train,val,test}/NNNNNN.png
  OUT/{train,val,test}.json   LLaVA records: id, image, conversations, question_type, answer,
                              text_size, qa (every turn), scene (objects and texts with boxes)
  OUT/meta.json               seed, image size, counts per split and question type, version
  OUT/corpus.txt              all questions and answers, for tokenizer training

The same --seed and sizes give byte-identical JSON and identical pixels; the splits use
different seeds and never share an image.
"""

from __future__ import annotations

import argparse

from ..commands.common import int_arg

DEFAULT_NUM_TRAIN = 2000
DEFAULT_NUM_VAL = 200
DEFAULT_NUM_TEST = 500


_non_negative_int = int_arg(0)
_positive_int = int_arg(1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory (created; must be empty unless --overwrite)")
    parser.add_argument("--num-train", type=_non_negative_int, default=DEFAULT_NUM_TRAIN, metavar="N",
                        help=f"training images (default {DEFAULT_NUM_TRAIN})")
    parser.add_argument("--num-val", type=_non_negative_int, default=DEFAULT_NUM_VAL, metavar="N",
                        help=f"validation images (default {DEFAULT_NUM_VAL})")
    parser.add_argument("--num-test", type=_non_negative_int, default=DEFAULT_NUM_TEST, metavar="N",
                        help=f"test images (default {DEFAULT_NUM_TEST})")
    parser.add_argument("--image-size", type=int, default=512, metavar="PX",
                        help="side of the square images in pixels, 128-4096 (default 512; object and text sizes "
                             "scale with it)")
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default 0)")
    parser.add_argument("--level", choices=("standard", "basic"), default="standard",
                        help="scene difficulty: 'standard' (default: up to 6 shapes, 160 words, 2-4 digit numbers, "
                             "text from 6 px at 512) or 'basic' (up to 4 shapes, at most one distractor text, "
                             "24 words, 2-digit numbers, text from 12 px at 512; what the bundled model learns)")
    parser.add_argument("--train-turns", type=int, default=None, metavar="K",
                        help="ask up to K questions (1-7) about each training image, one per question type, "
                             "for denser supervision; validation and test keep one question (sometimes two)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a dataset previously generated in --out (removes only the files this "
                             "command writes)")
    parser.add_argument("--workers", type=_positive_int, default=1, metavar="N",
                        help="processes that render and PNG-encode the images (default 1); the dataset is "
                             "byte-identical for any N")
    parser.add_argument("--no-progress", action="store_true", help="do not show a progress bar")


def run(args: argparse.Namespace) -> int:
    from .synth import QUESTION_TYPES, SPLITS, generate_dataset

    summary = generate_dataset(
        args.out,
        num_train=args.num_train,
        num_val=args.num_val,
        num_test=args.num_test,
        image_size=args.image_size,
        seed=args.seed,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        level=args.level,
        train_turns=args.train_turns,
        workers=args.workers,
    )
    counts = summary["counts"]
    total = sum(c["records"] for c in counts.values())
    print(f"wrote {total} images ({args.image_size}x{args.image_size}, seed {args.seed}) "
          f"to {summary['out_dir']} in {summary['seconds']:.1f} s")
    names = list(QUESTION_TYPES)
    header = ["split", "records", *names, "multi-turn"]
    rows = [[s, str(counts[s]["records"]), *(str(counts[s]["question_types"][t]) for t in names),
             str(counts[s]["multi_turn"])] for s in SPLITS]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    print("question types count the first turn of each record; "
          f"text sizes (px): {', '.join(map(str, summary['text_sizes']))}")
    return 0

"""Print the token ids a checkpoint folder's tokenizer gives for a set of texts, as JSON, with whatever
transformers is installed: run it under the reference's transformers 4.x (slow and fast tokenizers) and under this
project's environment on the same folder, and compare the outputs (session 22's check of `convert --to apple`).

  fastvlm convert fastvlm/assets/fastvlm-synth /tmp/apple --to apple
  python scripts/check_reference_tokenizer.py /tmp/apple > ours.json                 # this project's transformers
  /path/to/venv-with-transformers-4.48/bin/python scripts/check_reference_tokenizer.py /tmp/apple --slow > ref.json
  cmp ours.json ref.json
"""

from __future__ import annotations

import argparse
import json

TEXTS = [
    "What is in the image? A red circle and two blue squares.",
    "How many circles are there? 3",
    "Ünïcödé café, naïve 12 345 - ok?\n\n  two  spaces",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nRead the number.<|im_end|>\n"
    "<|im_start|>assistant\n",
    "The word is 'circle'. It's above the 7, isn't it?",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--slow", action="store_true", help="use_fast=False, as the reference's builder.py loads it")
    a = p.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.folder, use_fast=not a.slow)
    special = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    print(json.dumps({"ids": [tok(t)["input_ids"] for t in TEXTS], "special": special,
                      "decoded": [tok.decode(tok(t)["input_ids"]) for t in TEXTS]}, ensure_ascii=False))


if __name__ == "__main__":
    main()

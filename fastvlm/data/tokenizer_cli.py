"""Train a byte-level BPE tokenizer (Qwen2-style pre-tokenization and special tokens) on a dataset's text.

  fastvlm data tokenizer data/synth --out data/synth/tokenizer --vocab-size 1024

SOURCE is a text file (one document per line), a LLaVA-format .json/.jsonl file (its
conversation texts are used), or a directory holding corpus.txt (as `fastvlm data synth`
writes). The result loads with transformers.AutoTokenizer and with `fastvlm train`'s
`tokenizer:` key. Specials: <|endoftext|> (pad), <|im_start|>, <|im_end|> (eos).
"""

from __future__ import annotations

import json
import os
import sys


def add_arguments(p):
    p.add_argument("source", help="corpus .txt, LLaVA .json/.jsonl, or a directory with corpus.txt")
    p.add_argument("--out", "-o", required=True, help="output directory for the tokenizer files")
    p.add_argument("--vocab-size", type=int, default=1024, help="learnt vocabulary size incl. 256 bytes (default 1024)")
    p.add_argument("--overwrite", action="store_true", help="replace the tokenizer files in a non-empty --out")


def _texts(source: str):
    from ..errors import FastVLMError

    if os.path.isdir(source):
        source = os.path.join(source, "corpus.txt")
    if not os.path.isfile(source):
        raise FastVLMError(f"no corpus at {source}")
    if source.endswith((".json", ".jsonl")):
        with open(source, encoding="utf-8") as f:
            if source.endswith(".json"):
                try:
                    records = json.load(f)
                except json.JSONDecodeError as e:
                    raise FastVLMError(f"{source}: not valid JSON ({e})") from None
            else:
                records = []
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            records.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise FastVLMError(f"{source}: line {n} is not valid JSON ({e})") from None
        if not isinstance(records, list):
            raise FastVLMError(f"{source}: expected a list of LLaVA records, got a JSON {type(records).__name__}")
        for i, r in enumerate(records):
            turns = r.get("conversations", []) if isinstance(r, dict) else None
            if not isinstance(turns, list):
                raise FastVLMError(f"{source}: record {i} is not a LLaVA record with a list of conversations")
            for turn in turns:
                if isinstance(turn, dict):
                    yield str(turn.get("value", "")).replace("<image>", "")
    else:
        with open(source, encoding="utf-8") as f:
            yield from f


def run(args) -> int:
    from ..commands.common import prepare_output_dir
    from ..errors import FastVLMError
    from ..tokenization import train_bpe_tokenizer

    try:
        lines = list(_texts(args.source))
    except UnicodeDecodeError as e:
        raise FastVLMError(f"{args.source}: not UTF-8 text ({e}); give a text corpus, a LLaVA .json/.jsonl file or "
                           "a folder with corpus.txt") from None
    if not any(line.strip() for line in lines):
        raise FastVLMError(f"{args.source}: no text to train a tokenizer on (an empty corpus, or records without "
                           "conversation turns)")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise FastVLMError(f"output directory {args.out} is not empty (a tokenizer trained before?); choose a new "
                           f"or empty directory, or pass --overwrite to replace the tokenizer files in it")
    prepare_output_dir(args.out)  # an existing file, or a path that cannot be made, fails before training
    n_corpus = len(lines)
    # the chat frame's own words, so prompts tokenize compactly
    lines += ["You are a helpful assistant.\n", "system\n", "user\n", "assistant\n"] * 50
    tok = train_bpe_tokenizer(lines, args.vocab_size)
    tok.save_pretrained(args.out)
    print(f"wrote {args.out}: {len(tok)} tokens (trained on {n_corpus} lines of the corpus and 200 of the chat "
          "frame)", file=sys.stderr)
    return 0

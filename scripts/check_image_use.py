#!/usr/bin/env python
"""Does a training checkpoint's answer depend on the image? Answer loss with the right images vs rolled ones.

Reads a `fastvlm train` output directory and one of its step checkpoints, and scores the first N
validation records (the recipe's data.val) twice: with each record's own image and with the
next record's. Equal losses mean the model answers from the question alone.

  python scripts/check_image_use.py runs/bundled/res128 1000          # step_1000
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from safetensors.torch import load_file

from fastvlm.processing import build_prompt, load_image, preprocess_image, tokenize_prompt
from fastvlm.train.build import build_model
from fastvlm.train.recipe import load_recipe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a `fastvlm train` output directory")
    p.add_argument("step", type=int, help="which step_N checkpoint")
    p.add_argument("--n", type=int, default=64, help="validation records to score (default 64)")
    args = p.parse_args()
    recipe = load_recipe(os.path.join(args.run, "recipe.yaml"))
    model = build_model(recipe)
    model.load_state_dict(load_file(os.path.join(args.run, f"step_{args.step}", "model.safetensors")), strict=False)
    model.eval()
    val, root = recipe.data.val[0], recipe.data.image_folder[0]  # the recipe's first validation source
    with open(val) as f:
        records = json.load(f)[: args.n]
    tok = model.processor.tokenizer
    px = torch.stack([preprocess_image(load_image(os.path.join(root, r["image"])),
                                       model.config.image_size) for r in records])

    def answer_loss(pixels: torch.Tensor) -> float:
        total = 0.0
        for i, r in enumerate(records):
            question = r["conversations"][0]["value"].replace("<image>\n", "")
            prompt = build_prompt([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}])
            ids = tokenize_prompt(prompt, tok, model.num_image_tokens)
            answer = tok(r["conversations"][1]["value"], add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([ids + answer]), pixel_values=pixels[i:i + 1]).logits[0]
            logp = torch.log_softmax(logits[len(ids) - 1:-1].float(), -1)
            total -= logp[torch.arange(len(answer)), torch.tensor(answer)].sum().item()
        return total / len(records)

    right, rolled = answer_loss(px), answer_loss(px.roll(1, 0))
    print(json.dumps({"run": args.run, "step": args.step, "n": len(records),
                      "answer_loss_right_images": round(right, 4), "answer_loss_rolled_images": round(rolled, 4)}))


if __name__ == "__main__":
    main()

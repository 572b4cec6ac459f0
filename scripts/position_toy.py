#!/usr/bin/env python
"""Position questions without the encoder: can the bundled model's LM learn them from ideal visual tokens?

The bundled model answers "Is the A left or right of the B?" at chance although a linear probe reads both objects'
coordinates from its encoder's tokens (docs/bundled-model.md, "The bundled model"). This script takes the encoder out of the
question. It trains the bundled model's LM shape (a new Qwen2: 3 layers, 192 wide, 3 heads sharing 1 KV head,
through transformers) and an ``mlp2x_gelu``-shaped projector on *ideal* visual tokens computed from each record's
stored scene, then scores test splits by the answer's first token (the argmax; each answer word is one token).

The ideal tokens: the image is a ``--grid`` x ``--grid`` raster of tokens (4 x 4 = 16, as the shipped model at
256 px). Each token holds a fixed random vector for its cell; each object adds a fixed random vector for its
(colour, shape) plus its exact centre coordinates along two fixed random directions, to the token of the cell
its centre lies in. Texts are left out. So the tokens hold every answer exactly, and the only thing left to learn
is the language side: find the named objects' tokens, and compare.

Prompts are built by the trainer's own ``tokenize_conversation`` (conv_qwen_2 frame, labels on the assistant
turn and its closing ``<|im_end|>`` and newline), with the bundled tokenizer; optimisation as the stage-1
recipe (AdamW, lr 1e-3, 3% warmup then cosine, gradient clipping at 1, batches of 128), except that weight decay
(0.01) applies to every parameter, norms and biases too, and that it runs in fp32, not bf16 autocast.

  python scripts/position_toy.py --data runs/position-diagnostics --tokenizer runs/bundled/data/tokenizer \\
      --train pos_train --test pos_test --steps 800 --out toy-pairs.json

``--train``/``--warm-start``/``--test`` name splits in ``--data`` (``X`` is ``--data/X.json``, as written by
``scripts/single_question_split.py``). ``--reverse S`` adds, to the training set, split S's one-object
questions with the object named second ("Is the middle of the image left or right of the A?", answer flipped);
``--test`` accepts ``S:reversed`` for the same on a test split, and ``S:no-b`` / ``S:no-a`` for its pair questions
with the second / first object left out of the visual tokens (``--drop-b`` / ``--drop-a`` do that to training
pairs; together, each pair loses at most one of the two). ``--pairs-from FILE`` adds every answerable pair question
about FILE's scenes (both orders, both axes; `add_relation_turns.pair_records`) to the training set, and ``--image-last`` puts the
visual tokens after the question instead of before it; ``--only-named`` leaves every object but the two named ones
out of a pair question's tokens.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn

from fastvlm.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from fastvlm.data.synth import COLORS, OPPOSITE, SHAPES, SynthDataError, derive_answer
from fastvlm.train.collate import tokenize_conversation

sys.path.insert(0, str(Path(__file__).resolve().parent))
from add_relation_turns import moved_towards_middle, pair_records

RELATIONS = ("left or right of", "above or below")


def moved_b_record(record: dict, alpha: float, answers: str = "kept") -> dict | None:
    """A pair question's record with its second object moved along the asked axis to (1 - alpha) of the way
    from where it is to the middle of the image (its centre, which is all the ideal tokens read; and, with
    answers="derived", its box too). answers="kept": the answer stays the true one for the unmoved scene, so
    only the second object's coordinate in the tokens is scaled towards the middle. answers="derived": the
    answer is derived again from the moved scene; None where that is ambiguous (the two objects closer than
    the generator's margin). None for a record that is not a pair question."""
    qa = record.get("qa") or [{}]
    params = qa[0].get("params") or {}
    if record.get("question_type") != "position" or "b" not in params:
        return None
    if answers not in ("kept", "derived"):
        raise ValueError(f"answers must be 'kept' or 'derived', got {answers!r}")
    scene, _ = moved_towards_middle(record["scene"], params, alpha)
    answer = record["answer"]
    if answers == "derived":
        try:
            answer = derive_answer(scene, "position", params)
        except SynthDataError:
            return None
    out = dict(record, scene=scene, answer=answer)
    out["conversations"] = [record["conversations"][0], {"from": "gpt", "value": answer}]
    return out


def reversed_record(record: dict) -> dict:
    """A one-object question with the object named second: "Is the middle of the image <rel> the A?"."""
    question = record["conversations"][0]["value"]
    prefix = "<image>\nIs the "
    for rel in RELATIONS:
        suffix = f" {rel} the middle of the image?"
        if question.startswith(prefix) and question.endswith(suffix):
            name = question[len(prefix):-len(suffix)]
            break
    else:
        raise ValueError(f"{record.get('id')}: not a one-object question: {question!r}")
    out = copy.deepcopy(record)
    out["conversations"][0]["value"] = f"{prefix}middle of the image {rel} the {name}?"
    out["conversations"][1]["value"] = out["answer"] = OPPOSITE[record["answer"]]
    return out


class IdealTokens:
    """The ideal visual tokens of a scene (see the module docstring)."""

    def __init__(self, grid: int, dim: int, seed: int = 1234) -> None:
        g = torch.Generator().manual_seed(seed)
        scale = 3 / math.sqrt(dim)
        self.grid, self.dim = grid, dim
        self.objects = torch.randn(len(COLORS) * len(SHAPES), dim, generator=g) * scale
        self.cells = torch.randn(grid * grid, dim, generator=g) * scale
        self.coords = torch.randn(2, dim, generator=g) * scale

    def __call__(self, scene: dict, leave_out: list | None = None, keep_only: list | None = None) -> torch.Tensor:
        """The scene's tokens, without the object named by leave_out ([colour, shape]), and with keep_only (a list
        of [colour, shape]) without every object it does not name."""
        tokens = self.cells.clone()
        size, grid = scene["image_size"], self.grid
        for o in scene["objects"]:
            name = [o["color"], o["shape"]]
            if (leave_out is not None and name == list(leave_out)) or (
                    keep_only is not None and name not in [list(k) for k in keep_only]):
                continue
            cx, cy = o["center"]
            cell = min(int(cy * grid / size), grid - 1) * grid + min(int(cx * grid / size), grid - 1)
            v = self.objects[list(COLORS).index(o["color"]) * len(SHAPES) + SHAPES.index(o["shape"])]
            tokens[cell] += v + (cx / size - 0.5) * self.coords[0] + (cy / size - 0.5) * self.coords[1]
        return tokens


def left_out_object(record: dict, hide_a: float, hide_b: float, rng: random.Random) -> list | None:
    """The [colour, shape] of the pair question's object to leave out of the tokens, or None: the second object
    with probability hide_b, else the first with probability hide_a (one draw per pair unless either is 1)."""
    if record.get("question_type") != "position" or not (hide_a or hide_b):
        return None
    u = 0.0 if 1 in (hide_a, hide_b) else rng.random()
    params = record["qa"][0]["params"]
    if hide_b and (hide_b == 1 or u < hide_b):
        return params["b"]
    if hide_a and (hide_a == 1 or u < hide_b + hide_a):
        return params["a"]
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder of one-question splits (scripts/single_question_split.py)")
    ap.add_argument("--tokenizer", required=True, help="the bundled model's tokenizer folder")
    ap.add_argument("--train", action="append", required=True, help="a training split name (repeatable)")
    ap.add_argument("--reverse", action="append", default=[],
                    help="also train on this one-object split's questions with the object named second")
    ap.add_argument("--pairs-from", default=None, metavar="SPLIT_JSON",
                    help="also train on every answerable pair question about this LLaVA split's scenes (all ordered "
                         "pairs, both axes): many more distinct pairs than the one-question splits hold")
    ap.add_argument("--warm-start", default=None, help="a split trained on alone for the first --warm-steps")
    ap.add_argument("--warm-steps", type=int, default=0)
    ap.add_argument("--test", action="append", required=True,
                    help="a test split name; NAME:reversed for its one-object questions asked the other way round, "
                         "NAME:no-b / NAME:no-a for its pair questions with the second / first object left out "
                         "of the tokens")
    ap.add_argument("--drop-b", type=float, nargs="?", const=1.0, default=0.0, metavar="FRACTION",
                    help="leave the second object of this fraction of the training pair questions (alone: all of "
                         "them) out of the visual tokens; the answer then follows from the first object alone for "
                         "most pairs. Test splits keep every object")
    ap.add_argument("--drop-a", type=float, nargs="?", const=1.0, default=0.0, metavar="FRACTION",
                    help="the same for the first object (with --drop-b: the fractions of pairs that lose the first "
                         "or the second object, at most 1 together). With only one of the two shown, the answer "
                         "flips with which one it is, so the model must tell the two names' roles apart")
    ap.add_argument("--only-named", action="store_true",
                    help="pair questions' visual tokens hold the two named objects only, train and test: no other "
                         "object to tell them from, so only the two names' roles are left to learn")
    ap.add_argument("--image-last", action="store_true",
                    help="put the visual tokens after the question text (\"Q?\\n<image>\"), train and test, not before it "
                         "as the synthetic data and the reference's preprocessing do: a diagnostic of the causal order")
    ap.add_argument("--centre-b", type=int, default=0, metavar="STEPS",
                    help="a curriculum: for the first STEPS steps, each training pair question's second object is "
                         "moved along the asked axis towards the middle of the image in its visual tokens (all the "
                         "way at step 0, not at all from STEPS on); see --centre-b-answers")
    ap.add_argument("--centre-b-mix", type=float, default=0.0, metavar="FRACTION",
                    help="no schedule: at every step, this fraction of the training pair questions has its second "
                         "object moved by a fraction drawn uniformly from [0, 1) (see --centre-b-answers)")
    ap.add_argument("--centre-b-answers", choices=("kept", "derived"), default="kept",
                    help="kept: the answers stay the true ones (only the second object's coordinate in the tokens "
                         "is scaled towards the middle); derived: answers derived again from the moved scene "
                         "(a moved pair whose answer is ambiguous is trained unmoved)")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--init-std", type=float, default=0.02, help="the LM's initializer_range (Qwen2's 0.02)")
    ap.add_argument("--grid", type=int, default=4)
    ap.add_argument("--system-prompt", default=None, help="default: none (shorter sequences)")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="JSON file for the arguments and the accuracy history")
    args = ap.parse_args(argv)
    if args.warm_steps and not args.warm_start:
        ap.error("--warm-steps needs --warm-start")
    if not (0 <= args.drop_b <= 1 and 0 <= args.drop_a <= 1 and args.drop_a + args.drop_b <= 1):
        ap.error("--drop-a and --drop-b take fractions between 0 and 1, at most 1 together")
    if (args.centre_b or args.centre_b_mix) and (args.drop_a or args.drop_b):
        ap.error("--centre-b/--centre-b-mix and --drop-a/--drop-b do not combine (moved pairs are never hidden)")
    if args.centre_b < 0 or not 0 <= args.centre_b_mix <= 1:
        ap.error("--centre-b takes a number of steps >= 0 and --centre-b-mix a fraction between 0 and 1")

    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tok = AutoTokenizer.from_pretrained(args.tokenizer, use_fast=True)
    ideal = IdealTokens(args.grid, 64)
    n_img = args.grid * args.grid

    def split(name: str) -> list[dict]:
        base, _, how = name.partition(":")
        records = json.loads((Path(args.data) / f"{base}.json").read_text())
        if how not in ("", "reversed", "no-b", "no-a"):
            raise SystemExit(f"unknown split modifier {how!r} in {name!r}")
        return [reversed_record(r) for r in records] if how == "reversed" else records

    hide_rng = random.Random(f"drop-b/{args.seed}")
    mix_rng = random.Random(f"centre-b-mix/{args.seed}")

    text_cache: dict = {}  # (question, answer) texts -> token ids and labels

    def encode(records: list[dict], hide_b: float = 0.0, hide_a: float = 0.0) -> list[tuple]:
        out, token_cache = [], {}  # id(scene) -> its ideal tokens, when no object is left out (records keeps
        # every scene alive for this call, so no id is reused within it)
        for r in records:
            turns = tuple(("user" if t["from"] == "human" else "assistant", t["value"]) for t in r["conversations"])
            if args.image_last and turns[0][1].startswith("<image>\n"):
                turns = (("user", turns[0][1][len("<image>\n"):] + "\n<image>"),) + turns[1:]
            if turns not in text_cache:
                tc = tokenize_conversation(list(turns), tok, n_img, args.system_prompt)
                text_cache[turns] = (torch.tensor(tc.input_ids), torch.tensor(tc.labels))
            leave_out = left_out_object(r, hide_a, hide_b, hide_rng)
            if args.only_named and r.get("question_type") == "position":
                params = r["qa"][0]["params"]
                tokens = ideal(r["scene"], leave_out, keep_only=[params["a"], params["b"]])
            elif leave_out is None:
                if id(r["scene"]) not in token_cache:
                    token_cache[id(r["scene"])] = ideal(r["scene"])
                tokens = token_cache[id(r["scene"])]
            else:
                tokens = ideal(r["scene"], leave_out)
            out.append((*text_cache[turns], tokens))
        return out

    pool = [r for s in args.train for r in split(s)] + [r for s in args.reverse for r in split(f"{s}:reversed")]
    if args.pairs_from:
        pool += pair_records(json.loads(Path(args.pairs_from).read_text()))
    train = encode(pool, hide_b=args.drop_b, hide_a=args.drop_a)
    warm = encode(split(args.warm_start), hide_b=args.drop_b, hide_a=args.drop_a) if args.warm_start else None
    tests = {name: encode(split(name), hide_b=float(name.endswith(":no-b")), hide_a=float(name.endswith(":no-a")))
             for name in args.test}
    print(f"train {len(train)}, warm start {len(warm or [])}, tests {({k: len(v) for k, v in tests.items()})}",
          flush=True)

    cfg = Qwen2Config(vocab_size=len(tok) + (-len(tok)) % 64, hidden_size=192, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, intermediate_size=512,
                      max_position_embeddings=4096, rope_theta=1e6, tie_word_embeddings=True,
                      max_window_layers=args.layers, rms_norm_eps=1e-6, initializer_range=args.init_std)
    lm = Qwen2ForCausalLM(cfg)
    proj = nn.Sequential(nn.Linear(64, 192), nn.GELU(), nn.Linear(192, 192))
    params = list(lm.parameters()) + list(proj.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    warmup = max(1, int(0.03 * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))

    def batch(items: list[tuple]):
        n = max(len(x[0]) for x in items)
        ids = torch.zeros(len(items), n, dtype=torch.long)
        labels = torch.full((len(items), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(len(items), n, dtype=torch.long)
        for i, (x, y, _) in enumerate(items):
            ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = x, y, 1
        embeds = lm.get_input_embeddings()(ids.clamp(min=0))
        embeds[ids == IMAGE_TOKEN_INDEX] = proj(torch.stack([x[2] for x in items])).reshape(-1, cfg.hidden_size)
        return embeds, labels, mask

    @torch.no_grad()
    def accuracy(items: list[tuple]) -> float:
        lm.eval()
        correct = 0
        for i in range(0, len(items), 64):
            chunk = items[i:i + 64]
            embeds, labels, mask = batch(chunk)
            logits = lm(inputs_embeds=embeds, attention_mask=mask).logits
            for b in range(len(chunk)):
                first = int((labels[b] != IGNORE_INDEX).nonzero()[0]) - 1  # predicts the answer's first token
                correct += int(logits[b, first].argmax()) == int(labels[b, first + 1])
        lm.train()
        return correct / len(items)

    history, order, smooth, t0 = [], [], None, time.time()
    for step in range(args.steps):
        source = warm if warm is not None and step < args.warm_steps else train
        if step == args.warm_steps:
            order = []
        if len(order) < args.batch_size:
            order += rng.sample(range(len(source)), len(source))
        idx, order = order[:args.batch_size], order[args.batch_size:]
        if source is train and ((args.centre_b and step < args.centre_b) or args.centre_b_mix):
            if args.centre_b and step < args.centre_b:
                alphas = [step / args.centre_b] * len(idx)
            else:
                alphas = [mix_rng.random() if mix_rng.random() < args.centre_b_mix else None for _ in idx]
            moved = [moved_b_record(pool[i], a, args.centre_b_answers) if a is not None else None
                     for i, a in zip(idx, alphas)]
            fresh = encode([m for m in moved if m is not None])
            items = [fresh.pop(0) if m is not None else source[i] for i, m in zip(idx, moved)]
        else:
            items = [source[i] for i in idx]
        embeds, labels, mask = batch(items)
        loss = lm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            acc = {name: round(accuracy(items), 4) for name, items in tests.items()}
            history.append({"step": step + 1, "train_loss_ema": round(smooth, 4), "accuracy": acc,
                            "elapsed_s": round(time.time() - t0, 1)})
            print(json.dumps(history[-1]), flush=True)
            Path(args.out).write_text(json.dumps({"args": vars(args), "history": history}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

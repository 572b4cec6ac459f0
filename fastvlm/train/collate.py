"""Conversations to training tensors: the chat frame, label masking, padding, batching.

Label masking follows the reference's ``preprocess_qwen_2`` (``train_qwen.py``): the
conversation is rendered in the ``conv_qwen_2`` frame

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n   (repeated per turn)

and only each assistant turn's text plus its closing ``<|im_end|>`` and ``\\n`` carry
labels. The system turn, the user turns, the ``<|im_start|>assistant\\n`` prefix and the
image positions are IGNORE_INDEX (-100).

The reference finds the label boundaries by tokenizing round prefixes separately and
taking the length of the common prefix with the whole conversation's tokens. Here the
whole conversation is tokenized once (chunk by chunk around ``<image>``, exactly as
:func:`fastvlm.processing.tokenize_prompt` does at inference) with character offsets, and
a token is labelled when its characters overlap an assistant span. Both rules agree on
every boundary, including a token that straddles one (``"assistant\\n" + "\\nanswer"``
merging into a ``"\\n\\n"`` token is labelled in both), and this one cannot fall out of
step: the reference masks a whole sample when its bookkeeping disagrees, which never
happens here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from ..config import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from ..errors import ConfigError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Internal role names; the dataset maps LLaVA's human/gpt onto them.
USER, ASSISTANT = "user", "assistant"


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    labels: list[int]

    @property
    def num_labels(self) -> int:
        """Supervised tokens as the loss counts them (labels shifted by one)."""
        return sum(1 for x in self.labels[1:] if x != IGNORE_INDEX)


def render_conversation(
    turns: Sequence[tuple[str, str]], system_prompt: Optional[str]
) -> tuple[str, list[tuple[int, int]]]:
    """The conversation in the conv_qwen_2 frame, and the character spans that carry labels.

    ``turns`` are (role, text) pairs with role "user" or "assistant". Each span covers an
    assistant turn's text and the ``<|im_end|>\\n`` that closes it.
    """
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0

    def add(s: str) -> None:
        nonlocal pos
        parts.append(s)
        pos += len(s)

    if system_prompt is not None:
        add(f"{IM_START}system\n{system_prompt}{IM_END}\n")
    for role, text in turns:
        add(f"{IM_START}{role}\n")
        if role == ASSISTANT:
            start = pos
            add(f"{text}{IM_END}\n")
            spans.append((start, pos))
        elif text:
            add(f"{text}{IM_END}\n")
        # else: an empty user turn is its bare role, as conv_qwen_2 (and build_prompt at inference) renders it
    return "".join(parts), spans


def tokenize_conversation(
    turns: Sequence[tuple[str, str]],
    tokenizer: Any,
    num_image_tokens: int,
    system_prompt: Optional[str],
) -> TokenizedConversation:
    """Token ids and labels of a conversation (each ``<image>`` becomes ``num_image_tokens`` × -200).

    ``input_ids`` equal ``tokenize_prompt(render_conversation(...)[0], ...)``; labels are
    the ids inside assistant spans and IGNORE_INDEX elsewhere.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("training needs a fast (Rust) tokenizer for character offsets; "
                          "load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
    text, spans = render_conversation(turns, system_prompt)
    chunks = text.split(IMAGE_TOKEN)
    starts = []
    pos = 0
    for c in chunks:
        starts.append(pos)
        pos += len(c) + len(IMAGE_TOKEN)
    nonempty = [k for k, c in enumerate(chunks) if c]
    enc = tokenizer([chunks[k] for k in nonempty], add_special_tokens=False, return_offsets_mapping=True)
    by_chunk = dict(zip(nonempty, zip(enc["input_ids"], enc["offset_mapping"])))

    ids: list[int] = []
    labels: list[int] = []
    span_starts = np.array([s for s, _ in spans], dtype=np.int64)
    span_ends = np.array([e for _, e in spans], dtype=np.int64)
    for k in range(len(chunks)):
        if k:
            ids.extend([IMAGE_TOKEN_INDEX] * num_image_tokens)
            labels.extend([IGNORE_INDEX] * num_image_tokens)
        if k not in by_chunk:
            continue
        chunk_ids, offsets = by_chunk[k]
        if not chunk_ids:
            continue
        off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2) + starts[k]
        # token [s, e) overlaps span [a, b) iff e > a and s < b
        inside = ((off[:, 1:2] > span_starts[None, :]) & (off[:, 0:1] < span_ends[None, :])).any(axis=1)
        ids.extend(int(i) for i in chunk_ids)
        labels.extend(int(i) if m else IGNORE_INDEX for i, m in zip(chunk_ids, inside))
    return TokenizedConversation(ids, labels)


# ---------------------------------------------------------------------------------------
# Collation
# ---------------------------------------------------------------------------------------


class DataCollator:
    """Samples (from :class:`fastvlm.train.data.ConversationDataset`) to a right-padded batch.

    Returns ``input_ids`` (padded with ``pad_token_id``), ``labels`` (padded with -100),
    ``attention_mask`` (1 on real tokens), ``pixel_values`` ``[N, 3, S, S]`` in placeholder
    order (None when the batch has no image), ``image_features`` (the same for samples that
    carry cached encoder features, see :mod:`fastvlm.train.features`), ``num_label_tokens`` (supervised tokens as the
    shifted loss counts them), ``num_samples``, ``ids``, and ``skipped`` (messages of samples
    whose images failed to load with ``skip_bad``; they are left out, never replaced).

    Nothing is truncated here: the dataset refuses (or, with ``skip_bad``, skips) samples
    longer than ``max_length`` up front, so an image's token run can never be cut.

    A batch whose samples were all skipped becomes a one-token dummy with no labels, so a
    process in distributed training still takes part in the step (its loss is 0).
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = int(pad_token_id)

    def __call__(self, samples: Sequence[dict]) -> dict:
        import torch

        kept = [s for s in samples if not s.get("skipped")]
        skipped = [s["skipped"] for s in samples if s.get("skipped")]
        if not kept:
            return {
                "input_ids": torch.tensor([[self.pad_token_id]], dtype=torch.long),
                "labels": torch.tensor([[IGNORE_INDEX]], dtype=torch.long),
                "attention_mask": torch.ones(1, 1, dtype=torch.long),
                "pixel_values": None,
                "image_features": None,
                "num_label_tokens": 0,
                "num_samples": 0,
                "num_tokens": 0,
                "ids": [],
                "skipped": skipped,
            }
        width = max(len(s["input_ids"]) for s in kept)
        n = len(kept)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        for row, s in enumerate(kept):
            L = len(s["input_ids"])
            input_ids[row, :L] = torch.as_tensor(s["input_ids"], dtype=torch.long)
            labels[row, :L] = torch.as_tensor(s["labels"], dtype=torch.long)
            attention_mask[row, :L] = 1
        pixels = [s["pixel_values"] for s in kept if s.get("pixel_values") is not None and len(s["pixel_values"])]
        feats = [s["image_features"] for s in kept if s.get("image_features") is not None and len(s["image_features"])]
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "pixel_values": torch.cat(pixels) if pixels else None,
            "image_features": torch.cat(feats) if feats else None,
            "num_label_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum()),
            "num_samples": n,
            "num_tokens": int(attention_mask.sum()),
            "ids": [s.get("id") for s in kept],
            "skipped": skipped,
        }


# ---------------------------------------------------------------------------------------
# Batching: global batches, length grouping, sharding across processes
# ---------------------------------------------------------------------------------------


def epoch_batches(
    lengths: Sequence[int],
    global_batch_size: int,
    *,
    seed: int,
    epoch: int,
    group_by_length: bool = True,
    has_images: Optional[Sequence[bool]] = None,
    mega_batch_mult: int = 16,
) -> list[np.ndarray]:
    """The global batches (arrays of dataset indices) of one epoch, a pure function of its arguments.

    Without grouping: a random permutation cut into batches. With grouping (the idea of
    LLaVA's modality-length sampler): the permutation is cut into mega-batches of
    ``mega_batch_mult`` global batches, each sorted by (has images, length) so samples of
    one kind and similar length share a batch, then cut into global batches whose order
    is shuffled; the batch with the longest sample goes first so an out-of-memory shows
    at step 1, not hours in. Inside a batch, samples stay sorted, so each micro-batch
    (see :func:`micro_batches`) holds similar lengths and little padding.

    The last incomplete global batch is dropped (every step sees exactly
    ``global_batch_size`` samples, which keeps resumption and multi-process runs exact).
    """
    n = len(lengths)
    rng = np.random.default_rng([int(seed), int(epoch), 0x5EED])
    perm = rng.permutation(n)
    num_batches = n // global_batch_size
    if num_batches == 0:
        return []
    if not group_by_length:
        return [perm[i * global_batch_size:(i + 1) * global_batch_size] for i in range(num_batches)]
    lengths = np.asarray(lengths, dtype=np.int64)
    kind = np.zeros(n, dtype=np.int64) if has_images is None else np.asarray(has_images, dtype=np.int64)
    mega = global_batch_size * max(1, int(mega_batch_mult))
    ordered = []
    for i in range(0, n, mega):
        chunk = perm[i:i + mega]
        # lexsort: last key is primary -> by kind, then by length descending; stable on ties
        order = np.lexsort((-lengths[chunk], -kind[chunk]))
        ordered.append(chunk[order])
    flat = np.concatenate(ordered)
    batches = [flat[i * global_batch_size:(i + 1) * global_batch_size] for i in range(num_batches)]
    order = rng.permutation(num_batches)
    batches = [batches[i] for i in order]
    longest = int(np.argmax([lengths[b].max() for b in batches]))
    batches[0], batches[longest] = batches[longest], batches[0]
    return batches


def micro_batches(global_batch: np.ndarray, accumulation_steps: int, world_size: int, rank: int) -> list[list[int]]:
    """This process's micro-batches of one global batch.

    The global batch is cut into ``accumulation_steps`` consecutive groups of
    ``per_device × world_size`` samples; process ``rank`` takes every ``world_size``-th
    sample of each group. A group is the same set of samples whatever the number of
    processes, so one process with per-device batch B and N processes with B/N each
    compute the same gradient.
    """
    n = len(global_batch)
    group = n // accumulation_steps
    if group * accumulation_steps != n or group % world_size:
        raise ConfigError(f"global batch {n} is not per_device x accumulation ({accumulation_steps}) x "
                          f"world size ({world_size})")
    return [
        [int(i) for i in global_batch[m * group:(m + 1) * group][rank::world_size]]
        for m in range(accumulation_steps)
    ]


class GlobalBatchSampler:
    """A batch sampler for ``torch.utils.data.DataLoader(batch_sampler=...)``.

    Yields this process's micro-batches, ``accumulation_steps`` per optimizer step,
    starting at ``start_step`` of the epoch set with :meth:`set_epoch`. The order is a
    function of (seed, epoch) only, so a resumed run sees exactly the samples the
    interrupted one would have, even with another number of processes (same global batch).
    """

    def __init__(self, lengths: Sequence[int], *, global_batch_size: int, accumulation_steps: int,
                 world_size: int = 1, rank: int = 0, seed: int = 0, group_by_length: bool = True,
                 has_images: Optional[Sequence[bool]] = None) -> None:
        if global_batch_size % (accumulation_steps * world_size):
            raise ConfigError(f"global batch size {global_batch_size} is not divisible by accumulation steps "
                              f"({accumulation_steps}) x world size ({world_size})")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.has_images = None if has_images is None else np.asarray(has_images, dtype=bool)
        self.global_batch_size = global_batch_size
        self.accumulation_steps = accumulation_steps
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.group_by_length = group_by_length
        self.epoch = 0
        self.start_step = 0

    @property
    def steps_per_epoch(self) -> int:
        return len(self.lengths) // self.global_batch_size

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch = int(epoch)
        self.start_step = int(start_step)

    def global_batches(self) -> list[np.ndarray]:
        return epoch_batches(self.lengths, self.global_batch_size, seed=self.seed, epoch=self.epoch,
                             group_by_length=self.group_by_length, has_images=self.has_images)

    def __iter__(self):
        for gb in self.global_batches()[self.start_step:]:
            yield from micro_batches(gb, self.accumulation_steps, self.world_size, self.rank)

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch - self.start_step) * self.accumulation_steps

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "start_step": self.start_step,
                "global_batch_size": self.global_batch_size, "num_samples": int(len(self.lengths)),
                "group_by_length": self.group_by_length,
                "lengths_checksum": int(self.lengths.sum() % (2**31 - 1))}

    def check_compatible(self, state: dict) -> None:
        """Raise if a checkpoint's sampler was built over other data or another batch size."""
        mine = self.state_dict()
        for key in ("seed", "global_batch_size", "num_samples", "group_by_length", "lengths_checksum"):
            if key in state and state[key] != mine[key]:
                raise ConfigError(
                    f"cannot resume: the checkpoint's data order was built with {key}={state[key]}, this run has "
                    f"{mine[key]} (the data files, their bad-record skipping, the global batch size or the seed "
                    "changed); resume with the same recipe and data, or start a new run")


def eval_batches(n: int, per_device_batch_size: int, world_size: int, rank: int) -> list[list[int]]:
    """Validation micro-batches for this process: every sample once, in order.

    Every process gets the same number of batches (the last ones may be empty), so
    collective operations in the forward pass (FSDP) stay in step.
    """
    batches = [list(range(i, min(i + per_device_batch_size, n))) for i in range(0, n, per_device_batch_size)]
    per_rank = math.ceil(len(batches) / world_size) if batches else 0
    mine = batches[rank::world_size]
    return mine + [[] for _ in range(per_rank - len(mine))]


__all__ = [
    "DataCollator",
    "GlobalBatchSampler",
    "TokenizedConversation",
    "epoch_batches",
    "eval_batches",
    "micro_batches",
    "render_conversation",
    "tokenize_conversation",
]

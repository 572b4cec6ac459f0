"""LLaVA-format conversation datasets.

A record is ``{"id": ..., "image": PATH | [PATH, ...] | absent, "conversations":
[{"from": "human", "value": "<image>\\nQuestion"}, {"from": "gpt", "value": "Answer"}, ...]}``.
Files are a JSON list of records (``.json``) or one record per line (``.jsonl``; read
lazily: only the byte offset of each line stays in memory and records are read on
demand). Image paths are relative to the image folder given with the file (absolute
paths are used as they are).

Roles: ``human`` (or ``user``) and ``gpt`` (or ``assistant``) must alternate, starting
with a human turn and ending with a gpt turn; one leading ``system`` turn may replace the
model's system prompt. ``<image>`` may appear only in human turns, once per image, in the
order of the record's image list.

**Placeholder rule.** With ``add_missing_placeholder`` (recipe key ``data.add_missing_placeholder``, off by
default), when a record has exactly one image and no ``<image>`` anywhere in its conversation,
``<image>\\n`` is prepended to the first human turn (such records are counted in ``placeholders_added`` and
logged); off, that record is refused like any other mismatch. In every other case the placeholders must match the
images one to one, and nothing is guessed for multi-image records. A record with one image trains with its
``<image>`` at the front of its turn (``"<image>\\n"`` + the rest of the turn, stripped), as the reference's
``preprocess_multimodal`` moves it; in multi-image records every placeholder stays where it is.

**Validation.** Every record is checked once when the dataset is built, before training
starts: structure, roles and alternation, placeholder count against images, that each
image file exists (and, with ``check_images="open"``, that PIL can read its header), and
the token length after image expansion against ``max_length``. A failure raises
:class:`DataError` naming the file, the record's index and its id. With
``skip_bad=True`` the record is logged, counted (``bad_counts``) and left out instead;
another sample is never substituted for it. An image that exists but cannot be decoded
is only found when the sample is loaded: it then raises, or with ``skip_bad`` the sample
is dropped from its batch and reported through the batch's ``skipped`` list.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..config import IMAGE_TOKEN
from ..errors import FastVLMError
from .collate import ASSISTANT, USER, tokenize_conversation

logger = logging.getLogger("fastvlm.train")
SKIP_LOGGER = "fastvlm.train.skips"  # samples skipped while training (every process logs its own)

_ROLES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT}
CHECK_IMAGES = ("open", "exists", "none")


class DataError(FastVLMError):
    """A training record is malformed; the message names the file, the record index and its id.

    ``kind`` is a short category (e.g. ``"missing_image"``) used to count skipped records.
    """

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class Conversation:
    """A validated record: resolved image paths, (role, text) turns, optional system prompt."""

    id: Any
    images: list[str]
    turns: list[tuple[str, str]]
    system: Optional[str] = None
    placeholder_added: bool = False  # one image, no <image>: put before the first question


def _where(path: str, index: int, record: Any) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return f"{path}: record {index} (id {rid!r})" if rid is not None else f"{path}: record {index} (no id)"


def parse_record(record: Any, *, path: str, index: int, image_folder: Optional[str],
                 add_missing_placeholder: bool = False) -> Conversation:
    """Check a record's structure and return it as a :class:`Conversation` (images not opened).

    ``add_missing_placeholder``: the placeholder rule (module docstring); off, such a record is refused."""
    where = _where(path, index, record)

    def bad(msg: str, kind: str) -> DataError:
        return DataError(f"{where}: {msg}", kind)

    if not isinstance(record, dict):
        raise bad(f"a record must be a JSON object, got {type(record).__name__}", "not_a_record")
    conv = record.get("conversations")
    if conv is None:
        raise bad("no 'conversations'", "empty_conversation")
    if not isinstance(conv, list):
        raise bad(f"'conversations' must be a list, got {type(conv).__name__}", "bad_turn")
    if not conv:
        raise bad("empty conversation", "empty_conversation")

    turns: list[tuple[str, str]] = []
    system = None
    for k, turn in enumerate(conv):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise bad(f"turn {k} must be an object with 'from' and 'value'", "bad_turn")
        who, value = turn["from"], turn["value"]
        if not isinstance(who, str):
            raise bad(f"turn {k} has unknown role {who!r} (expected 'human' or 'gpt')", "bad_roles")
        if not isinstance(value, str):
            raise bad(f"turn {k} ({who}): 'value' must be a string, got {type(value).__name__}", "bad_turn")
        if who == "system":
            if k != 0:
                raise bad(f"turn {k}: a system turn is only allowed first", "bad_roles")
            system = value
            continue
        if who not in _ROLES:
            raise bad(f"turn {k} has unknown role {who!r} (expected 'human' or 'gpt')", "bad_roles")
        role = _ROLES[who]
        expected = USER if len(turns) % 2 == 0 else ASSISTANT
        if role != expected:
            want = "human" if expected == USER else "gpt"
            raise bad(f"turn {k} is from {who!r} but a {want!r} turn was expected (turns must alternate human, gpt, "
                      "human, gpt, ... starting with human)", "bad_roles")
        if role == ASSISTANT:
            if not value.strip():
                raise bad(f"turn {k} (gpt) is empty", "empty_answer")
            if IMAGE_TOKEN in value:
                raise bad(f"turn {k} (gpt) contains {IMAGE_TOKEN}; images belong in human turns",
                          "placeholder_mismatch")
        turns.append((role, value))
    if not turns:
        raise bad("empty conversation (only a system turn)", "empty_conversation")
    if turns[-1][0] != ASSISTANT:
        raise bad("the conversation ends with a human turn; it must end with a gpt answer", "bad_roles")

    image = record.get("image")
    if image is None:
        images: list[str] = []
    elif isinstance(image, str):
        images = [image]
    elif isinstance(image, list) and all(isinstance(x, str) for x in image):
        images = list(image)
    else:
        raise bad(f"'image' must be a path or a list of paths, got {type(image).__name__}", "bad_image_field")
    if any(not x for x in images):
        raise bad("'image' holds an empty path", "bad_image_field")

    n_ph = sum(text.count(IMAGE_TOKEN) for _, text in turns)
    if len(images) == 1 and n_ph == 0 and add_missing_placeholder:
        # a lone image with no placeholder goes before the first question (counted and logged)
        turns[0] = (USER, IMAGE_TOKEN + "\n" + turns[0][1])
        n_ph = 1
        added = True
    else:
        added = False
    if n_ph != len(images):
        hint = (" (data.add_missing_placeholder: true puts one before the first question)"
                if len(images) == 1 and n_ph == 0 else "")
        raise bad(f"{n_ph} {IMAGE_TOKEN} placeholder(s) but {len(images)} image(s){hint}", "placeholder_mismatch")
    if len(images) == 1:
        # As the reference's preprocess_multimodal: the turn's one <image> goes to its front, "<image>\n" + the
        # rest stripped, stripped again ("Describe it. <image>" trains as "<image>\nDescribe it.", as inference
        # prompts it; a turn of "<image>" alone stays "<image>")
        turns = [(role, (IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()).strip()
                  if IMAGE_TOKEN in text else text) for role, text in turns]

    resolved = [p if os.path.isabs(p) or image_folder is None else os.path.join(image_folder, p) for p in images]
    return Conversation(id=record.get("id", index), images=resolved, turns=turns, system=system,
                        placeholder_added=added)


def load_training_image(path: str, image_size: int, image_aspect_ratio: str):
    """An image file as the model's input tensor, under the same size limits as inference: the pixel limit
    (checked before decoding) and the working canvas of the pad or crop (a long strip's padded square)."""
    from ..processing import DEFAULT_MAX_PIXELS, check_padded_size, load_image, preprocess_image

    image = load_image(path)
    check_padded_size(image, image_aspect_ratio, DEFAULT_MAX_PIXELS, name=f"image {path}", image_size=image_size)
    return preprocess_image(image, image_size, image_aspect_ratio)


def check_image_file(path: str, how: str, image_size: Optional[int] = None,
                     image_aspect_ratio: Optional[str] = None) -> Optional[tuple[str, str]]:
    """None if the image passes the check, else (kind, problem). With ``how="open"`` the header's size is held
    to the limits loading applies (so an image over them is found before training, not at its step); the
    canvas limit needs the model's `image_size` and `image_aspect_ratio`."""
    if how == "none":
        return None
    if not os.path.exists(path):
        return "missing_image", f"image not found: {path}"
    if not os.path.isfile(path):
        return "missing_image", f"image path is not a file: {path}"
    if how == "open":
        from PIL import Image

        try:
            from ..errors import ImageError
            from ..processing import DEFAULT_MAX_PIXELS, check_image_size, check_padded_size

            with Image.open(path) as im:
                try:  # the limits loading applies (load_training_image), from the header
                    check_image_size(im, f"image {path}", DEFAULT_MAX_PIXELS)
                    if image_size and image_aspect_ratio:
                        check_padded_size(im, image_aspect_ratio, DEFAULT_MAX_PIXELS, name=f"image {path}",
                                          image_size=image_size)
                except ImageError as e:
                    return "unreadable_image", str(e)
        except Exception as e:  # noqa: BLE001 - PIL raises many types on bad files
            return "unreadable_image", f"image {path} is unreadable ({type(e).__name__}: {e})"
    return None


_JSON_WS = re.compile(r"[ \t\n\r]*")


def _index_json_list(path: str) -> tuple[bytearray, np.ndarray]:
    """A JSON list file as (buffer, offsets): record i is ``buffer[offsets[i]:offsets[i + 1]]``, its own JSON text.

    The records are decoded one at a time while indexing and kept as compact UTF-8 text in one buffer, not as
    Python objects: about the file's size in memory instead of several times it, and one object that forked
    DataLoader workers share without copying (a list of dicts is copied page by page as its reference counts
    change). Each record is parsed again when it is read."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is dropped, as for .jsonl files
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}); give a LLaVA-format .json or .jsonl file") from None
    decoder = json.JSONDecoder()
    i = _JSON_WS.match(text).end()
    if not text.startswith("[", i):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e}); use .jsonl for one record per line") from None
        raise DataError(f"{path} must hold a JSON list of records, got {type(data).__name__}")
    buffer, offsets = bytearray(), [0]
    i = _JSON_WS.match(text, i + 1).end()
    if text.startswith("]", i):
        i += 1
    else:
        while True:
            try:
                _, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} is not valid JSON ({e}); use .jsonl for one record per line") from None
            buffer += text[i:end].encode("utf-8")
            offsets.append(len(buffer))
            i = _JSON_WS.match(text, end).end()
            if text.startswith(",", i):
                i = _JSON_WS.match(text, i + 1).end()
            elif text.startswith("]", i):
                i += 1
                break
            else:
                line = text.count("\n", 0, i) + 1
                raise DataError(f"{path} is not valid JSON (expected ',' or ']' after record {len(offsets) - 2}, "
                                f"line {line}); use .jsonl for one record per line")
    if _JSON_WS.match(text, i).end() != len(text):
        raise DataError(f"{path} is not valid JSON (extra data after the list, line {text.count(chr(10), 0, i) + 1})")
    return buffer, np.asarray(offsets, dtype=np.int64)


class _Source:
    """One data file: a JSON list kept as one buffer of per-record JSON text, or a JSONL file indexed by line
    offsets. Either way a record is parsed when it is read."""

    def __init__(self, path: str, image_folder: Optional[str]) -> None:
        self.path = path
        self.image_folder = image_folder
        if os.path.isdir(path):
            raise DataError(f"data file {path} is a folder; give a LLaVA-format .json or .jsonl file in it")
        if not os.path.isfile(path):
            raise DataError(f"no such data file: {path}")
        self.buffer: Optional[bytearray] = None
        self.offsets: Optional[np.ndarray] = None
        self._fh = None
        self._fh_pid = None
        if path.endswith(".jsonl"):
            offsets = []
            with open(path, "rb") as f:
                pos = 0
                for line in f:
                    if line.strip():
                        offsets.append(pos)
                    pos += len(line)
            self.offsets = np.asarray(offsets, dtype=np.int64)
        else:
            self.buffer, self.offsets = _index_json_list(path)

    def __len__(self) -> int:
        return len(self.offsets) - 1 if self.buffer is not None else len(self.offsets)

    def __getstate__(self):
        # DataLoader workers get their own file handle.
        state = dict(self.__dict__)
        state["_fh"] = None
        state["_fh_pid"] = None
        return state

    def record(self, index: int) -> Any:
        if self.buffer is not None:
            return json.loads(self.buffer[int(self.offsets[index]):int(self.offsets[index + 1])])
        if self._fh is None or self._fh_pid != os.getpid():
            self._fh = open(self.path, "rb")
            self._fh_pid = os.getpid()
        self._fh.seek(int(self.offsets[index]))
        line = self._fh.readline()
        try:
            return json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            what = "valid JSON" if isinstance(e, json.JSONDecodeError) else "UTF-8 text"
            raise DataError(f"{self.path}: record {index} (line {_line_number(self.path, int(self.offsets[index]))}) "
                            f"is not {what}: {e}", "invalid_json") from None


def _line_number(path: str, offset: int) -> int:
    """The 1-based line of `path` that starts at byte `offset` (for error messages)."""
    count, done = 1, 0
    with open(path, "rb") as f:
        while done < offset:
            chunk = f.read(min(1 << 20, offset - done))
            if not chunk:
                break
            count += chunk.count(b"\n")
            done += len(chunk)
    return count


class ConversationDataset:
    """Validated, tokenized LLaVA-format conversations with their images.

    ``files``: one path or a list; ``image_folders``: one folder for all files or one per
    file. ``__getitem__`` returns ``{"input_ids", "labels", "pixel_values" ([n, 3, S, S] or
    None), "id", "index"}``, or ``{"skipped": message}`` for an image that fails to load
    under ``skip_bad``. ``lengths`` (tokens after image expansion), ``num_labels`` and
    ``has_images`` describe every kept record for batching.
    """

    def __init__(
        self,
        files: Union[str, Sequence[str]],
        image_folders: Union[None, str, Sequence[Optional[str]]],
        *,
        tokenizer: Any,
        num_image_tokens: int,
        image_size: int,
        image_aspect_ratio: str = "pad",
        system_prompt: Optional[str] = "You are a helpful assistant.",
        max_length: Optional[int] = None,
        skip_bad: bool = False,
        check_images: str = "open",
        add_missing_placeholder: bool = False,
        progress: bool = False,
    ) -> None:
        files = [files] if isinstance(files, str) else list(files)
        if not files:
            raise DataError("no data files given")
        if image_folders is None or isinstance(image_folders, str):
            image_folders = [image_folders] * len(files)
        image_folders = list(image_folders)
        if len(image_folders) != len(files):
            raise DataError(f"{len(files)} data files but {len(image_folders)} image folders; give one folder "
                            "for all files or one per file")
        if check_images not in CHECK_IMAGES:
            raise DataError(f"check_images must be one of {CHECK_IMAGES}, got {check_images!r}")
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.image_size = image_size
        self.image_aspect_ratio = image_aspect_ratio
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.skip_bad = skip_bad
        self.check_images = check_images
        self.add_missing_placeholder = add_missing_placeholder
        self.sources = [_Source(f, d) for f, d in zip(files, image_folders)]
        self.bad_counts: Counter = Counter()
        self.bad_examples: list[str] = []
        # records given the placeholder rule's <image> (counted and logged, and in the run summary)
        self.placeholders_added = 0
        self._index(progress)

    # ------------------------------------------------------------------ validation pass
    def _index(self, progress: bool) -> None:
        src_ids, rec_ids, lengths, num_labels, has_images = [], [], [], [], []
        first = None  # the first record given the placeholder rule's <image>
        total = sum(len(s) for s in self.sources)
        bar = None
        if progress and total > 1000:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="checking data", unit="rec", leave=False)
        for si, src in enumerate(self.sources):
            for ri in range(len(src)):
                try:
                    conv, tok = self._load(si, ri, check=True)
                except DataError as e:
                    if not self.skip_bad:
                        raise
                    self._bad(e)
                    continue
                finally:
                    if bar is not None:
                        bar.update(1)
                src_ids.append(si)
                rec_ids.append(ri)
                lengths.append(len(tok.input_ids))
                num_labels.append(tok.num_labels)
                has_images.append(bool(conv.images))
                if conv.placeholder_added:
                    if not self.placeholders_added:
                        first = self.describe_record(si, ri)
                    self.placeholders_added += 1
        if bar is not None:
            bar.close()
        if self.placeholders_added:
            logger.warning("%d record(s) have one image and no %s placeholder; it was put before the first "
                           "question (first: %s)", self.placeholders_added, IMAGE_TOKEN, first)
        self.source_index = np.asarray(src_ids, dtype=np.int32)
        self.record_index = np.asarray(rec_ids, dtype=np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.num_labels = np.asarray(num_labels, dtype=np.int64)
        self.has_images = np.asarray(has_images, dtype=bool)
        if len(self.lengths) == 0:
            raise DataError(f"no usable records in {', '.join(s.path for s in self.sources)}"
                            + (f" ({self.num_bad} skipped as bad)" if self.num_bad else ""))

    def _bad(self, error: DataError) -> None:
        self.bad_counts[error.kind] += 1
        if len(self.bad_examples) < 20:
            self.bad_examples.append(str(error))
        logger.warning("skipping bad record: %s", error)

    @property
    def num_bad(self) -> int:
        return sum(self.bad_counts.values())

    def _load(self, si: int, ri: int, *, check: bool):
        src = self.sources[si]
        record = src.record(ri)
        conv = parse_record(record, path=src.path, index=ri, image_folder=src.image_folder,
                            add_missing_placeholder=self.add_missing_placeholder)
        where = _where(src.path, ri, record)
        if check:
            for p in conv.images:
                problem = check_image_file(p, self.check_images, self.image_size, self.image_aspect_ratio)
                if problem:
                    raise DataError(f"{where}: {problem[1]}", problem[0])
        system = conv.system if conv.system is not None else self.system_prompt
        tok = tokenize_conversation(conv.turns, self.tokenizer, self.num_image_tokens, system)
        if check and self.max_length is not None and len(tok.input_ids) > self.max_length:
            raise DataError(f"{where}: {len(tok.input_ids)} tokens after expanding {len(conv.images)} image(s) to "
                            f"{self.num_image_tokens} tokens each, more than max_length={self.max_length} "
                            "(cutting it could drop image tokens or the answer)", "too_long")
        return conv, tok

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.lengths)

    def describe(self, i: int) -> str:
        return self.describe_record(int(self.source_index[i]), int(self.record_index[i]))

    def describe_record(self, si: int, ri: int) -> str:
        return _where(self.sources[si].path, ri, self.sources[si].record(ri))

    def image_paths(self, i: int) -> list[str]:
        """The image files of sample ``i`` (already resolved against the image folder); no tokenizing."""
        si, ri = int(self.source_index[i]), int(self.record_index[i])
        src = self.sources[si]
        return parse_record(src.record(ri), path=src.path, index=ri, image_folder=src.image_folder,
                            add_missing_placeholder=self.add_missing_placeholder).images

    def load_tokens(self, i: int):
        """(conversation, tokenized conversation) of sample ``i``, without loading its images."""
        return self._load(int(self.source_index[i]), int(self.record_index[i]), check=False)

    def __getitem__(self, i: int) -> dict:
        import torch

        from ..errors import ImageError

        conv, tok = self.load_tokens(i)
        pixels = None
        if conv.images:
            try:
                pixels = torch.stack([
                    load_training_image(p, self.image_size, self.image_aspect_ratio) for p in conv.images
                ])
            except ImageError as e:
                msg = f"{self.describe(i)}: {e}"
                if not self.skip_bad:
                    raise DataError(msg, "unreadable_image") from None
                logging.getLogger(SKIP_LOGGER).warning("skipping sample whose image failed to load: %s", msg)
                return {"skipped": msg, "index": i}
        return {"input_ids": tok.input_ids, "labels": tok.labels, "pixel_values": pixels, "id": conv.id, "index": i}


__all__ = ["CHECK_IMAGES", "Conversation", "ConversationDataset", "DataError", "check_image_file",
           "load_training_image", "parse_record"]

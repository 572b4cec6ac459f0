"""Benchmark samples, readers for the files as their owners distribute them, and the
task registry.

A reader takes the path of a benchmark file (``data``) and an optional image folder
(``image_root``; by default the owner's layout next to the file, else the file's own
folder) and returns :class:`Sample` objects whose ``prompt`` is the text to send to the
model: the question plus the task's instruction, never an ``<image>`` placeholder (the
model glue places image tokens; LLaVA's eval scripts also strip the placeholder and put
it first).

Prompts follow LLaVA-1.5 / lmms-eval, the setting of FastVLM's published numbers:

* short-answer tasks (TextVQA, DocVQA, ChartQA, GQA, POPE): ``"{question}\\nAnswer the
  question using a single word or phrase."`` (lmms-eval ``post_prompt``; TextVQA also
  applies ``str.capitalize()`` to the question like lmms-eval's ``textvqa_doc_to_text``,
  without OCR tokens, lmms-eval's default);
* ScienceQA-IMG: ``"Context: {hint}\\n"`` (only when there is a hint) ``+ question +
  "\\nA. ...\\nB. ..." + "\\nAnswer with the option's letter from the given choices
  directly."`` (LLaVA-1.5 ``llava_test_CQM-A.json`` with ``--single-pred-prompt``; the
  same text as lmms-eval ``sqa_doc_to_text``).

Bad input raises :class:`fastvlm.errors.FastVLMError` (data) or :class:`ConfigError`
(arguments), with the file and the record in the message.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from ..errors import ConfigError, FastVLMError
from . import metrics as M

__all__ = [
    "Sample",
    "Task",
    "TASKS",
    "get_task",
    "read_textvqa",
    "read_docvqa",
    "read_chartqa",
    "read_pope",
    "read_gqa",
    "read_scienceqa_img",
    "read_llava",
    "short_answer_prompt",
    "scienceqa_prompt",
    "text_size_bucket",
    "TEXT_SIZE_EDGES",
]

PathLike = Union[str, os.PathLike]
IMAGE_PLACEHOLDER = "<image>"


@dataclass
class Sample:
    """One evaluation item.

    id: unique within the task (a string; ids are the resume keys of the runner).
    question: the question as written in the benchmark file.
    prompt: the text sent to the model (question plus the task's instruction). It holds
        no ``<image>`` placeholder; one image token per entry of ``images`` is the
        glue's business.
    references: the reference answers (TextVQA: the ten human answers; ScienceQA: the
        correct letter; POPE: "yes"/"no").
    images: absolute or root-joined image paths, in order; empty for text-only items.
    extra: task-specific fields (e.g. ScienceQA ``choices``/``answer_index``, POPE
        ``label``/``category``, GQA ``types``, synthetic ``question_type``/``text_size``).
    """

    id: str
    question: str
    prompt: str
    references: list[str]
    images: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def image(self) -> Optional[str]:
        """The first image path, or None."""
        return self.images[0] if self.images else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------
# file helpers
# ---------------------------------------------------------------------------


def _path(data: PathLike) -> Path:
    p = Path(data).expanduser()
    if not p.exists():
        raise FastVLMError(f"{p}: no such file or directory")
    return p


def _not_a_folder(path: Path) -> None:
    if path.is_dir():
        raise FastVLMError(f"{path} is a folder; this task reads one file (a JSON or JSON-lines benchmark file)")


def _no_duplicate_keys(path: Path):
    """An object_pairs_hook that refuses a key given twice in one object (json keeps the last silently: two
    GQA questions under one id would be one)."""
    def hook(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                raise FastVLMError(f"{path}: the key {k!r} appears twice in one JSON object (a duplicate sample id?)")
            out[k] = v
        return out
    return hook


def _load_json(path: Path) -> Any:
    _not_a_folder(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, object_pairs_hook=_no_duplicate_keys(path))
    except json.JSONDecodeError as e:
        raise FastVLMError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise FastVLMError(f"{path}: not UTF-8 text ({e})") from None


def _load_json_or_lines(path: Path) -> Any:
    """A JSON document, or JSON lines (POPE's ``.json`` files are JSON lines)."""
    _not_a_folder(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FastVLMError(f"{path}: not UTF-8 text ({e})") from None
    if path.suffix != ".jsonl":
        try:
            return json.loads(text, object_pairs_hook=_no_duplicate_keys(path))
        except json.JSONDecodeError as e:
            if not text.lstrip().startswith("{") or e.msg != "Extra data":
                raise FastVLMError(f"{path}: not valid JSON ({e})") from None
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise FastVLMError(f"{path}: line {lineno} is not valid JSON ({e})") from None
    return records


def _image_root(image_root: Optional[PathLike], candidates: Sequence[Path]) -> Path:
    """The given root, else the first candidate folder that exists (the last candidate
    is always the data file's own folder)."""
    if image_root is not None:
        return Path(image_root).expanduser()
    for c in candidates:
        if c.is_dir():
            return c
    return candidates[-1]


def _join(root: Path, name: str) -> str:
    return name if os.path.isabs(name) else str(root / name)


class _Record:
    """Field access on one record with errors that name the file and the record."""

    def __init__(self, path: Path, index: Union[int, str], rec: Any, id_key: Optional[str] = None):
        self.path, self.index, self.rec = path, index, rec
        if not isinstance(rec, dict):
            raise FastVLMError(f"{path}: record {index} is a {type(rec).__name__}, expected an object")
        self.where = f"{path}: record {index}"
        if id_key and id_key in rec:
            self.where += f" ({id_key}={rec[id_key]!r})"

    def get(self, key: str, types: Union[type, tuple], *, required: bool = True, default: Any = None) -> Any:
        if key not in self.rec or self.rec[key] is None:
            if required:
                raise FastVLMError(f"{self.where}: missing field {key!r}")
            return default
        value = self.rec[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
            names = "/".join(t.__name__ for t in _as_tuple(types))
            raise FastVLMError(f"{self.where}: field {key!r} should be {names}, got {type(value).__name__}")
        return value

    def answers(self, key: str) -> list[str]:
        value = self.get(key, (list, str, int, float))
        if isinstance(value, list):
            if not value or not all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in value):
                raise FastVLMError(f"{self.where}: field {key!r} should be a non-empty list of strings")
            return [str(a) for a in value]
        return [str(value)]

    def human_answers(self, key: str) -> list[str]:
        """The annotators' answers that VQA accuracy needs: a list of several (TextVQA has ten). One answer
        would score every prediction 0 (its leave-one-out subset is empty), so it is refused here."""
        value = self.get(key, list)
        answers = self.answers(key)
        if len(value) < 2:
            raise FastVLMError(f"{self.where}: field {key!r} holds {len(value)} answer; VQA accuracy needs the "
                               "annotators' answers (ten in TextVQA), and scores any prediction 0 against one")
        return answers

    def fail(self, message: str) -> FastVLMError:
        return FastVLMError(f"{self.where}: {message}")


def _as_tuple(types: Union[type, tuple]) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def _records(path: Path, doc: Any, key: Optional[str] = "data") -> list:
    if isinstance(doc, dict) and key is not None:
        if key not in doc:
            raise FastVLMError(f"{path}: expected a top-level {key!r} list, found keys {sorted(doc)[:8]}")
        doc = doc[key]
    if not isinstance(doc, list):
        raise FastVLMError(f"{path}: expected a list of records, got {type(doc).__name__}")
    return doc


def _check_unique(samples: list[Sample], path: Path) -> list[Sample]:
    seen: set[str] = set()
    for s in samples:
        if s.id in seen:
            raise FastVLMError(f"{path}: duplicate sample id {s.id!r}")
        seen.add(s.id)
    return samples


def _clean_prompt_text(text: str) -> str:
    return text.replace(IMAGE_PLACEHOLDER, "").strip()


# ---------------------------------------------------------------------------
# prompt builders
# ---------------------------------------------------------------------------


def short_answer_prompt(sample: Sample) -> str:
    """``question + "\\n" + "Answer the question using a single word or phrase."``;
    the instruction is not added twice when the question already ends with it (LLaVA's
    own question files carry it)."""
    q = _clean_prompt_text(sample.question)
    if q.endswith(M.SHORT_ANSWER_PROMPT):
        return q
    return f"{q}\n{M.SHORT_ANSWER_PROMPT}"


def textvqa_prompt(sample: Sample) -> str:
    """lmms-eval ``textvqa_doc_to_text``: ``question.capitalize()`` (Python's, which also
    lower-cases the rest) + the short-answer instruction; no OCR tokens."""
    q = _clean_prompt_text(sample.question).capitalize()
    return f"{q}\n{M.SHORT_ANSWER_PROMPT}"


def scienceqa_prompt(sample: Sample) -> str:
    """LLaVA-1.5 / lmms-eval ScienceQA prompt: optional ``Context: {hint}`` line, the
    question, one ``"A. choice"`` line per option, then the letter instruction."""
    hint = sample.extra.get("hint") or ""
    choices = sample.extra.get("choices") or []
    context = f"Context: {hint}\n" if hint else ""
    options = "\n".join(f"{M._LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{context}{sample.question}\n{options}\n{M.MULTIPLE_CHOICE_PROMPT}"


def verbatim_prompt(sample: Sample) -> str:
    """The record's own prompt: a ``prompt`` field, else the human turn of a
    conversation as written, else the question + the short-answer instruction."""
    if "prompt" in sample.extra:
        return _clean_prompt_text(str(sample.extra["prompt"]))
    if sample.extra.get("from_conversation"):
        return _clean_prompt_text(sample.question)
    return short_answer_prompt(sample)


# ---------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------


def read_textvqa(data: PathLike, image_root: Optional[PathLike] = None) -> list[Sample]:
    """TextVQA ``TextVQA_0.5.1_val.json`` (or train): ``{"data": [{question_id, question,
    image_id, answers (10), ...}]}``; images ``{image_id}.jpg`` under ``train_images/``
    (the val images are in the train folder). Default root: ``train_images`` or
    ``train_val_images/train_images`` next to the file or one level up, else the
    file's folder."""
    path = _path(data)
    d = path.parent
    root = _image_root(
        image_root,
        [
            d / "train_images",
            d / "train_val_images" / "train_images",
            d.parent / "train_images",
            d.parent / "train_val_images" / "train_images",
            d,
        ],
    )
    samples = []
    for i, raw in enumerate(_records(path, _load_json(path))):
        r = _Record(path, i, raw, "question_id")
        qid = r.get("question_id", (int, str))
        image_id = r.get("image_id", str)
        s = Sample(
            id=str(qid),
            question=r.get("question", str),
            prompt="",
            references=r.human_answers("answers"),
            images=[_join(root, f"{image_id}.jpg")],
            extra={"question_id": qid, "image_id": image_id},
        )
        s.prompt = textvqa_prompt(s)
        samples.append(s)
    return _check_unique(samples, path)


def read_docvqa(data: PathLike, image_root: Optional[PathLike] = None) -> list[Sample]:
    """DocVQA ``val_v1.0.json`` / ``val_v1.0_withQT.json``: ``{"data": [{questionId,
    question, image: "documents/xxx.png", answers, question_types?, docId?}]}``. Image
    paths are relative to the file's folder (the owner's ``val/`` layout)."""
    path = _path(data)
    root = _image_root(image_root, [path.parent])
    samples = []
    for i, raw in enumerate(_records(path, _load_json(path))):
        r = _Record(path, i, raw, "questionId")
        qid = r.get("questionId", (int, str))
        qtypes = r.get("question_types", list, required=False, default=[])
        s = Sample(
            id=str(qid),
            question=r.get("question", str),
            prompt="",
            references=r.answers("answers"),
            images=[_join(root, r.get("image", str))],
            extra={"questionId": qid, "question_types": [str(t) for t in qtypes], "docId": raw.get("docId")},
        )
        s.prompt = short_answer_prompt(s)
        samples.append(s)
    return _check_unique(samples, path)


def _chartqa_split(path: Path) -> str:
    stem = path.stem
    if stem.endswith("_human"):
        return "human"
    if stem.endswith("_augmented"):
        return "augmented"
    return stem


def read_chartqa(data: PathLike, image_root: Optional[PathLike] = None) -> list[Sample]:
    """ChartQA ``test_human.json`` / ``test_augmented.json``: a list of ``{imgname,
    query, label}``; images in ``png/`` next to the file. ``data`` may also be the
    split folder (``ChartQA Dataset/test``): both files are read, ids are
    ``"human/17"``, ``"augmented/17"`` (the record's index; ChartQA has no ids)."""
    path = _path(data)
    if path.is_dir():
        files = [path / n for n in ("test_human.json", "test_augmented.json") if (path / n).is_file()]
        if not files:
            files = sorted(p for p in path.glob("*.json") if p.stem.endswith(("_human", "_augmented")))
        if not files:
            raise FastVLMError(f"{path}: no ChartQA *_human.json / *_augmented.json files in this folder")
    else:
        files = [path]
    samples = []
    for f in files:
        split = _chartqa_split(f)
        root = _image_root(image_root, [f.parent / "png", f.parent])
        for i, raw in enumerate(_records(f, _load_json(f), key=None)):
            r = _Record(f, i, raw, "imgname")
            label = r.get("label", (str, int, float))
            s = Sample(
                id=f"{split}/{i}",
                question=r.get("query", str),
                prompt="",
                references=[str(label)],
                images=[_join(root, r.get("imgname", str))],
                extra={"split": split, "imgname": raw["imgname"]},
            )
            s.prompt = short_answer_prompt(s)
            samples.append(s)
    return _check_unique(samples, path)


def _pope_category(path: Path) -> Optional[str]:
    # POPE's files: coco_pope_random.json, aokvqa_pope_seem_adversarial.json, ...
    stem = path.stem
    for cat in ("adversarial", "popular", "random"):
        if stem.endswith(cat):
            return cat
    return None


def read_pope(data: PathLike, image_root: Optional[PathLike] = None) -> list[Sample]:
    """POPE question files as in the POPE repository (``coco_pope_random.json`` etc.,
    JSON lines of ``{question_id, image, text, label: "yes"/"no"}``), or LLaVA's
    ``llava_pope_test.jsonl`` style records that also carry ``label`` and ``category``.

    ``data`` may be a folder: every ``*pope*.json``/``.jsonl`` in it is read. The
    category (random/popular/adversarial) comes from the record's ``category`` or the
    file name; ids are ``"{category}/{question_id}"`` when a category is known (POPE's
    question ids restart at 1 in every file). Images (COCO val2014) default to
    ``val2014/`` next to the file, else the file's folder."""
    path = _path(data)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl") and "pope" in p.name)
        if not files:
            raise FastVLMError(f"{path}: no POPE *.json / *.jsonl files in this folder")
    else:
        files = [path]
    samples = []
    for f in files:
        doc = _load_json_or_lines(f)
        if isinstance(doc, dict):
            doc = [doc]
        root = _image_root(image_root, [f.parent / "val2014", f.parent])
        file_cat = _pope_category(f)
        for i, raw in enumerate(_records(f, doc, key=None)):
            r = _Record(f, i, raw, "question_id")
            qid = r.get("question_id", (int, str))
            label = r.get("label", str).strip().lower()
            if label not in ("yes", "no"):
                raise r.fail(f"field 'label' should be 'yes' or 'no', got {raw['label']!r}")
            cat = r.get("category", str, required=False) or file_cat
            s = Sample(
                id=f"{cat}/{qid}" if cat else str(qid),
                question=r.get("text", str),
                prompt="",
                references=[label],
                images=[_join(root, r.get("image", str))],
                extra={"question_id": qid, "label": label, "category": cat},
            )
            s.prompt = short_answer_prompt(s)
            samples.append(s)
    return _check_unique(samples, path)


def read_gqa(data: PathLike, image_root: Optional[PathLike] = None) -> list[Sample]:
    """GQA ``testdev_balanced_questions.json``: ``{question_id: {imageId, question,
    answer, types: {structural, semantic, detailed}, ...}}``; images
    ``{imageId}.jpg`` in ``images/`` (next to the file or one level up), else the file's
    folder."""
    path = _path(data)
    d = path.parent
    root = _image_root(image_root, [d / "images", d.parent / "images", d])
    doc = _load_json(path)
    if not isinstance(doc, dict):
        raise FastVLMError(f"{path}: expected an object mapping question ids to questions, got {type(doc).__name__}")
    samples = []
    for qid, raw in doc.items():
        r = _Record(path, qid, raw)
        types = r.get("types", dict, required=False, default={})
        s = Sample(
            id=str(qid),
            question=r.get("question", str),
            prompt="",
            references=[str(r.get("answer", (str, int)))],
            images=[_join(root, f"{r.get('imageId', (str, int))}.jpg")],
            extra={"imageId": str(raw["imageId"]), "types": {k: str(v) for k, v in types.items()}},
        )
        s.prompt = short_answer_prompt(s)
        samples.append(s)
    return samples


def read_scienceqa_img(
    data: PathLike, image_root: Optional[PathLike] = None, *, split: str = "test"
) -> list[Sample]:
    """ScienceQA ``problems.json`` (``{pid: {question, choices, answer (index), hint,
    image, subject, grade, split, ...}}``) with ``pid_splits.json`` beside it; only
    problems of ``split`` that have an image are kept (the IMG subset, 2017 in test).
    Without ``pid_splits.json`` the problems' own ``split`` field is used. ``data`` may
    be the folder holding the two files. Images: ``{root}/{pid}/{image}`` with root
    ``images/{split}`` (owner layout), else ``{split}/``, else the file's folder."""
    path = _path(data)
    if path.is_dir():
        path = path / "problems.json"
        if not path.is_file():
            raise FastVLMError(f"{path}: no such file (ScienceQA needs problems.json)")
    d = path.parent
    root = _image_root(image_root, [d / "images" / split, d / split, d])
    problems = _load_json(path)
    if not isinstance(problems, dict):
        raise FastVLMError(f"{path}: expected an object mapping problem ids to problems")
    splits_file = d / "pid_splits.json"
    if splits_file.is_file():
        splits = _load_json(splits_file)
        if not isinstance(splits, dict) or split not in splits:
            have = sorted(splits) if isinstance(splits, dict) else "?"
            raise ConfigError(f"{splits_file}: no split {split!r} (have {have})")
        pids = [str(p) for p in splits[split]]
        missing = [p for p in pids if p not in problems]
        if missing:
            raise FastVLMError(
                f"{splits_file}: split {split!r} lists {len(missing)} ids absent from {path.name}, e.g. {missing[0]!r}"
            )
    else:
        pids = [pid for pid, p in problems.items() if isinstance(p, dict) and p.get("split") == split]
    samples = []
    for pid in pids:
        r = _Record(path, pid, problems[pid])
        image = r.get("image", str, required=False)
        if not image:
            continue
        choices = r.get("choices", list)
        if not choices or len(choices) > 26:
            raise r.fail(f"field 'choices' should hold 1 to 26 options, has {len(choices)}")
        answer = r.get("answer", int)
        if not 0 <= answer < len(choices):
            raise r.fail(f"answer index {answer} is outside the {len(choices)} choices")
        letter = M._LETTERS[answer]
        s = Sample(
            id=str(pid),
            question=r.get("question", str),
            prompt="",
            references=[letter],
            images=[_join(root, os.path.join(str(pid), image))],
            extra={
                "choices": [str(c) for c in choices],
                "answer_index": answer,
                "answer_letter": letter,
                "hint": r.get("hint", str, required=False, default=""),
                "subject": _raw_str(problems[pid], "subject"),
                "grade": _raw_str(problems[pid], "grade"),
                "category": _raw_str(problems[pid], "category"),
            },
        )
        s.prompt = scienceqa_prompt(s)
        samples.append(s)
    return _check_unique(samples, path)


def _raw_str(rec: dict, key: str) -> Optional[str]:
    v = rec.get(key)
    return None if v is None else str(v)


_HUMAN_ROLES = ("human", "user")
_GPT_ROLES = ("gpt", "assistant")
_STANDARD_KEYS = {
    "id", "question_id", "image", "images", "conversations", "question", "text", "answer", "answers", "prompt",
}  # fmt: skip


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def read_llava(data: PathLike, image_root: Optional[PathLike] = None) -> list[Sample]:
    """Generic LLaVA-format JSON (a list) or JSON lines with reference answers.

    Each record has an ``id`` (or ``question_id``), an optional ``image`` (a path or a
    list of paths, relative to ``image_root``, default: the file's folder) and either

    * ``conversations``: ``[{"from": "human", "value": ...}, {"from": "gpt", "value":
      ...}, ...]``; the last gpt turn is the reference and the human turn before it
      is the prompt, sent as written minus ``<image>`` (earlier turns are kept in
      ``extra["history"]``); or
    * ``question`` (or ``text``) with ``answer`` (a string) or ``answers`` (a list); the
      prompt is the question + the short-answer instruction, unless the record has its
      own ``prompt``.

    Other scalar fields (e.g. ``question_type``, ``text_size`` of the synthetic set) are
    kept in ``extra`` and drive the per-type breakdowns; where a ``qa`` list describes each
    turn (the synthetic set), the asked (last) turn's entry gives them.
    """
    path = _path(data)
    doc = _load_json_or_lines(path)
    if isinstance(doc, dict):
        doc = doc["data"] if isinstance(doc.get("data"), list) else [doc]
    root = _image_root(image_root, [path.parent])
    samples = []
    for i, raw in enumerate(_records(path, doc, key=None)):
        r = _Record(path, i, raw, "id" if isinstance(raw, dict) and "id" in raw else "question_id")
        rid = raw.get("id", raw.get("question_id"))
        if rid is None or isinstance(rid, (bool, dict, list)):
            raise r.fail("missing field 'id' (or 'question_id')")
        image = raw.get("image", raw.get("images"))
        if image is None:
            images: list[str] = []
        elif isinstance(image, str):
            images = [_join(root, image)]
        elif isinstance(image, list) and all(isinstance(x, str) for x in image):
            images = [_join(root, x) for x in image]
        else:
            raise r.fail("field 'image' should be a path or a list of paths")
        extra: dict[str, Any] = {
            k: v
            for k, v in raw.items()
            if k not in _STANDARD_KEYS and _is_scalar(v)
        }
        if "prompt" in raw:
            extra["prompt"] = r.get("prompt", str)
        if "conversations" in raw:
            conv = r.get("conversations", list)
            for t, turn in enumerate(conv):
                ok = isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)
                if not ok:
                    raise r.fail(f"conversations[{t}] should be {{'from': str, 'value': str}}")
            last_gpt = max((t for t, turn in enumerate(conv) if turn["from"].lower() in _GPT_ROLES), default=None)
            if last_gpt is None:
                raise r.fail("conversations has no 'gpt' turn to use as the reference")
            human = [t for t, turn in enumerate(conv[:last_gpt]) if turn["from"].lower() in _HUMAN_ROLES]
            if not human:
                raise r.fail("conversations has no 'human' turn before the last 'gpt' turn")
            question = conv[human[-1]]["value"]
            references = [conv[last_gpt]["value"].strip()]
            extra["from_conversation"] = True
            # A record may describe each turn in a `qa` list, one entry per human/gpt pair (the synthetic
            # set's layout), while its top-level `question_type`/`text_size` describe the first turn: the
            # breakdown must follow the turn that is asked, the last one.
            qa = raw.get("qa")
            if isinstance(qa, list) and len(qa) * 2 == len(conv) and all(isinstance(q, dict) for q in qa):
                asked = qa[sum(t["from"].lower() in _GPT_ROLES for t in conv[: last_gpt + 1]) - 1]
                extra.update({k: asked[k] for k in ("question_type", "text_size") if k in asked and _is_scalar(asked[k])})
            if human[-1] > 0:
                extra["history"] = [{"from": t["from"], "value": t["value"]} for t in conv[: human[-1]]]
        else:
            if "question" not in raw and "text" not in raw:
                raise r.fail("missing field 'question' (or 'text', or a 'conversations' list)")
            question = r.get("question" if "question" in raw else "text", str)
            if "answers" in raw:
                references = r.answers("answers")
            elif "answer" in raw:
                references = r.answers("answer")
            else:
                raise r.fail("missing field 'answer' (or 'answers', or a 'conversations' list)")
        s = Sample(id=str(rid), question=question, prompt="", references=references, images=images, extra=extra)
        s.prompt = verbatim_prompt(s)
        samples.append(s)
    return _check_unique(samples, path)


# ---------------------------------------------------------------------------
# per-sample metrics and aggregation
# ---------------------------------------------------------------------------

def read_synth(data: PathLike, image_root: Optional[PathLike] = None) -> list[Sample]:
    """`fastvlm data synth` output: a split file (``OUT/test.json``), or the folder itself, which means its
    test split."""
    path = _path(data)
    if path.is_dir():
        test = path / "test.json"
        if not test.is_file():
            splits = sorted(p.name for p in path.glob("*.json"))
            raise FastVLMError(f"{path}: no test.json in this folder (a `fastvlm data synth` folder has one); "
                               f"pass a split file{', one of: ' + ', '.join(splits) if splits else ''}")
        path = test
    return read_llava(path, image_root)


# Edges (in pixels) of the text-size buckets of the synthetic set's breakdown.
TEXT_SIZE_EDGES = (8, 12, 16, 24, 32, 48, 64)


def text_size_bucket(value: Any) -> Optional[str]:
    """A bucket label for a ``text_size`` field: numbers (pixel heights) fall in
    ``TEXT_SIZE_EDGES`` ranges ("<8", "[8,12)", ..., ">=64"); strings are their own
    bucket; None stays None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        if isinstance(value, float) and math.isnan(value):
            return None
        if value < TEXT_SIZE_EDGES[0]:
            return f"<{TEXT_SIZE_EDGES[0]}"
        for lo, hi in zip(TEXT_SIZE_EDGES, TEXT_SIZE_EDGES[1:]):
            if lo <= value < hi:
                return f"[{lo},{hi})"
        return f">={TEXT_SIZE_EDGES[-1]}"
    return str(value)


GroupFn = Callable[[Sample], Union[None, str, list[str]]]


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _breakdown(samples: Sequence[Sample], per_sample: Sequence[dict], groups: dict[str, GroupFn]) -> dict:
    out: dict[str, dict] = {}
    for gname, fn in groups.items():
        buckets: dict[str, list[dict]] = defaultdict(list)
        for s, sc in zip(samples, per_sample):
            keys = fn(s)
            if keys is None:
                continue
            for k in [keys] if isinstance(keys, str) else keys:
                buckets[str(k)].append(sc)
        if buckets:
            out[gname] = {
                k: {"n": len(v), **{m: _mean([x[m] for x in v]) for m in v[0]}} for k, v in sorted(buckets.items())
            }
    return out


def mean_aggregate(groups: Optional[dict[str, GroupFn]] = None) -> Callable:
    """Aggregation: the mean of each per-sample score, overall and per group."""

    def aggregate(samples: Sequence[Sample], predictions: Sequence[str], per_sample: Sequence[dict]) -> dict:
        keys = list(per_sample[0]) if per_sample else []
        scores = {k: _mean([x[k] for x in per_sample]) for k in keys}
        return {"scores": scores, "breakdown": _breakdown(samples, per_sample, groups or {})}

    return aggregate


def _pope_aggregate(samples: Sequence[Sample], predictions: Sequence[str], per_sample: Sequence[dict]) -> dict:
    scores = M.pope_scores(predictions, [s.extra["label"] for s in samples])
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        if s.extra.get("category"):
            by_cat[s.extra["category"]].append(i)
    breakdown = {}
    if by_cat:
        breakdown["category"] = {
            c: M.pope_scores([predictions[i] for i in idx], [samples[i].extra["label"] for i in idx])
            for c, idx in sorted(by_cat.items())
        }
        if len(by_cat) > 1:
            # LLaVA prints one line per category; papers usually quote their mean F1.
            scores["f1_category_mean"] = _mean([v["f1"] for v in breakdown["category"].values()])
            scores["accuracy_category_mean"] = _mean([v["accuracy"] for v in breakdown["category"].values()])
    return {"scores": scores, "breakdown": breakdown}


def _vqa_metric(pred: str, s: Sample) -> dict:
    return {"accuracy": M.vqa_accuracy(pred, s.references)}


def _anls_metric(pred: str, s: Sample) -> dict:
    return {"anls": M.anls(pred, s.references)}


def _relaxed_metric(pred: str, s: Sample) -> dict:
    return {"relaxed_accuracy": max(M.relaxed_accuracy(pred, r) for r in s.references)}


def _pope_metric(pred: str, s: Sample) -> dict:
    return {"accuracy": 1.0 if M.pope_answer_to_label(pred) == s.extra["label"] else 0.0}


def _exact_metric(pred: str, s: Sample) -> dict:
    return {"accuracy": M.exact_match(pred, s.references)}


def _sqa_metric(pred: str, s: Sample) -> dict:
    k = len(s.extra["choices"])
    truth = s.extra["answer_letter"]
    # The headline is LLaVA-1.5's reading of the letter (eval_science_qa.py), so that it compares with published
    # numbers; the lenient reading (also "(C)", "C)", "answer: C", ...) is reported beside it.
    return {
        "accuracy": 1.0 if M.extract_choice_letter(pred, k, strict=True) == truth else 0.0,
        "accuracy_lenient": 1.0 if M.extract_choice_letter(pred, k) == truth else 0.0,
    }


def _open_metric(pred: str, s: Sample) -> dict:
    return {"accuracy": M.exact_match(pred, s.references), "anls": M.anls(pred, s.references)}


def _extra_key(key: str) -> GroupFn:
    return lambda s: None if s.extra.get(key) is None else str(s.extra[key])


_OPEN_GROUPS: dict[str, GroupFn] = {
    "question_type": _extra_key("question_type"),
    "text_size": lambda s: text_size_bucket(s.extra.get("text_size")),
}


# ---------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A benchmark: how to read it, prompt it and score it.

    reader(data, image_root=None, **kw) -> list[Sample], prompts already built with
        ``build_prompt``.
    build_prompt(sample) -> str: the default prompt (pass ``prompt_builder`` to
        :meth:`load` to use another).
    metric(prediction, sample) -> dict[str, float]: per-sample scores.
    aggregate(samples, predictions, per_sample) -> {"scores": {...}, "breakdown":
        {group: {value: {"n": ..., score: ...}}}}.
    primary: the key of ``scores`` a leaderboard quotes.
    """

    name: str
    reader: Callable[..., list[Sample]]
    build_prompt: Callable[[Sample], str]
    metric: Callable[[str, Sample], dict]
    aggregate: Callable[[Sequence[Sample], Sequence[str], Sequence[dict]], dict]
    primary: str
    description: str = ""

    def load(
        self,
        data: PathLike,
        image_root: Optional[PathLike] = None,
        *,
        limit: Optional[int] = None,
        prompt_builder: Optional[Callable[[Sample], str]] = None,
        check_images: bool = False,
        **reader_kwargs: Any,
    ) -> list[Sample]:
        """Read ``data`` with the task's reader; optionally keep the first ``limit``
        samples, rebuild prompts with ``prompt_builder``, and check that every image
        file exists (raising one error that lists the first missing ones)."""
        samples = self.reader(data, image_root, **reader_kwargs)
        if limit is not None:
            samples = samples[: max(0, limit)]
        if prompt_builder is not None:
            for s in samples:
                s.prompt = prompt_builder(s)
        if check_images:
            missing = [p for s in samples for p in s.images if not os.path.isfile(p)]
            if missing:
                raise FastVLMError(
                    f"{data}: {len(missing)} image file(s) not found, e.g. {missing[:3]}; give the folder they are relative to (--image-root)"
                )
        return samples

    def score(self, samples: Sequence[Sample], predictions: Sequence[str]) -> dict:
        """Scores of ``predictions[i]`` for ``samples[i]``: ``{"scores", "breakdown",
        "per_sample"}``."""
        if len(samples) != len(predictions):
            raise FastVLMError(f"{self.name}: {len(predictions)} predictions for {len(samples)} samples")
        per_sample = [self.metric(p, s) for p, s in zip(predictions, samples)]
        result = self.aggregate(samples, predictions, per_sample)
        result["per_sample"] = per_sample
        return result


_SHORT = "short answer + 'Answer the question using a single word or phrase.'"

TASKS: dict[str, Task] = {
    "textvqa": Task(
        "textvqa", read_textvqa, textvqa_prompt, _vqa_metric, mean_aggregate(), "accuracy",
        f"TextVQA val, VQA accuracy over 10 answers; {_SHORT}",
    ),
    "docvqa": Task(
        "docvqa", read_docvqa, short_answer_prompt, _anls_metric,
        mean_aggregate({"question_type": lambda s: s.extra.get("question_types") or None}), "anls",
        f"DocVQA val, ANLS; {_SHORT}",
    ),
    "chartqa": Task(
        "chartqa", read_chartqa, short_answer_prompt, _relaxed_metric,
        mean_aggregate({"split": _extra_key("split")}), "relaxed_accuracy",
        f"ChartQA test (human/augmented), relaxed accuracy; {_SHORT}",
    ),
    "pope": Task(
        "pope", read_pope, short_answer_prompt, _pope_metric, _pope_aggregate, "f1",
        f"POPE, yes/no accuracy/precision/recall/F1; {_SHORT}",
    ),
    "gqa": Task(
        "gqa", read_gqa, short_answer_prompt, _exact_metric,
        mean_aggregate({
            "structural": lambda s: s.extra.get("types", {}).get("structural"),
            "semantic": lambda s: s.extra.get("types", {}).get("semantic"),
        }), "accuracy",
        f"GQA testdev-balanced, exact match; {_SHORT}",
    ),
    "scienceqa_img": Task(
        "scienceqa_img", read_scienceqa_img, scienceqa_prompt, _sqa_metric,
        mean_aggregate({"subject": _extra_key("subject")}), "accuracy",
        "ScienceQA test, image questions; lettered options; letter accuracy as LLaVA-1.5 reads the letter "
        "(accuracy_lenient also reads '(C)', 'C)', 'answer: C')",
    ),
    "llava": Task(
        "llava", read_llava, verbatim_prompt, _open_metric, mean_aggregate(_OPEN_GROUPS), "accuracy",
        "LLaVA-format JSON/JSONL with references; normalised exact match and ANLS",
    ),
    "synth": Task(
        "synth", read_synth, verbatim_prompt, _open_metric, mean_aggregate(_OPEN_GROUPS), "accuracy",
        "the project's synthetic set; exact match and ANLS per question_type and text_size",
    ),
}  # fmt: skip
TASKS["jsonl"] = dataclasses.replace(TASKS["llava"], name="jsonl")


def get_task(task: Union[str, Task]) -> Task:
    """A :class:`Task` from its registry name (or the task itself)."""
    if isinstance(task, Task):
        return task
    try:
        return TASKS[task]
    except KeyError:
        raise ConfigError(f"unknown eval task {task!r}; known: {', '.join(sorted(TASKS))}") from None

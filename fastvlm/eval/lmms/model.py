"""The lmms-eval model class for FastVLM (``--model fastvlm``); see :mod:`fastvlm.eval.lmms`.

Request layouts (lmms-eval "simple" models, ``Instance.args``):

* ``generate_until``: ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``;
* ``loglikelihood``: ``(context, continuation_or_doc_to_target, doc_to_visual, doc_id,
  task, split)``, or ``(context, continuation)`` for the unconditional requests of
  ``acc_mutual_info``;
* ``generate_until_multi_round``: ``(context, gen_kwargs, doc_to_visual, doc_to_text,
  doc_id, task, split)``.

The document is ``self.task_dict[task][split][doc_id]`` (lmms-eval fills ``task_dict``);
``doc_to_visual(doc)`` gives its images (PIL images; paths and bytes work too; videos
and audio are refused).

Prompts: the context is the user message of the model's chat template. When it holds
exactly one ``<image>`` per image, the images go there; otherwise any ``<image>`` text
is removed and the images go first (``<image>\\n`` each), the reference's layout.

Log-likelihood: the continuation is scored after the chat prompt's open assistant turn
(``...<|im_start|>assistant\\n`` + continuation), exactly as written (lmms-eval's
multiple-choice requests prefix a space, ``target_delimiter``). Its tokens are the
tokens of ``prompt + continuation`` past the prompt's own (the lm-eval-harness rule;
when the prompt's tokens are not a prefix, the continuation is tokenized alone). The
result is ``(sum of log p(token | everything before it), whether each token is the
argmax)``, computed in float32 from one forward pass per batch with left padding;
requests of the same document share one image encoding.

Generation is our own KV-cache loop (:func:`fastvlm.generation.generate_steps`): greedy
unless ``do_sample`` (or, when ``do_sample`` is absent, ``temperature > 0``); it stops
at the end-of-turn token, at ``max_new_tokens``, or as soon as the text holds one of
``until``, and the text is cut before the first stop string. ``num_beams > 1`` is not
supported (answered greedily, with a warning).
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from typing import Any, Callable, Optional, Sequence

from ...errors import ConfigError, ImageError, PromptError

log = logging.getLogger("fastvlm.eval.lmms")

try:  # lmms-eval's base class when it is installed ...
    from lmms_eval.api.model import lmms as _LmmsBase

    LMMS_EVAL_IMPORT_ERROR: Optional[ImportError] = None
except ImportError as _e:  # ... else a stand-in with the attributes lmms-eval's evaluator uses
    LMMS_EVAL_IMPORT_ERROR = _e

    class _NullCacheHook:
        def add_partial(self, attr, req, res) -> None:
            pass

    class _LmmsBase:  # type: ignore[no-redef]
        is_simple = True

        def __init__(self) -> None:
            self._rank = 0
            self._world_size = 1
            self.cache_hook = _NullCacheHook()
            self.task_dict: dict = {}

        @property
        def rank(self) -> int:
            return self._rank

        @property
        def world_size(self) -> int:
            return self._world_size

        def set_cache_hook(self, cache_hook) -> None:
            self.cache_hook = cache_hook

        def clean(self) -> None:
            pass


try:  # lmms-eval >= 0.7 wraps model outputs in GenerationResult
    from lmms_eval.api.instance import GenerationResult as _GenerationResult
except ImportError:
    _GenerationResult = None


if _GenerationResult is not None:

    class LoglikelihoodResult(tuple, _GenerationResult):
        """``(logprob, is_greedy)``: a plain tuple to every caller. lmms-eval 0.7.3's
        evaluator passes each result through ``unwrap_generation_output``, which turns
        a ``(float, bool)`` tuple into its ``str`` (breaking every multiple-choice task);
        it hands a ``GenerationResult``'s ``.text`` through unchanged, so the result is
        also one, whose ``.text`` is the plain tuple."""

        token_counts = None

        def __new__(cls, logprob: float, is_greedy: bool):
            return tuple.__new__(cls, (float(logprob), bool(is_greedy)))

        def __init__(self, logprob: float, is_greedy: bool) -> None:
            pass

        @property
        def text(self) -> tuple:  # type: ignore[override]
            return tuple(self)

else:

    class LoglikelihoodResult(tuple):  # type: ignore[no-redef]
        """``(logprob, is_greedy)``."""

        def __new__(cls, logprob: float, is_greedy: bool):
            return tuple.__new__(cls, (float(logprob), bool(is_greedy)))


IMAGE_PLACEHOLDER = "<image>"
_VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".flv", ".wmv", ".mpeg", ".mpg")


# ---------------------------------------------------------------------------
# argument parsing
# ---------------------------------------------------------------------------


def parse_arg_string(arg_string: Optional[str]) -> dict[str, Any]:
    """``"a=1,b=x,c=True"`` -> ``{"a": 1, "b": "x", "c": True}`` (lmms-eval's model_args form)."""
    out: dict[str, Any] = {}
    if not arg_string:
        return out
    for part in str(arg_string).split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise ConfigError(f"model_args: expected key=value, got {part!r}")
        key, value = part.split("=", 1)
        out[key.strip()] = _convert(value.strip())
    return out


def _convert(value: str) -> Any:
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _as_int(value: Any, name: str, *, default: Optional[int] = None, minimum: int = 1) -> Optional[int]:
    if value is None or value == "":
        return default
    if isinstance(value, str) and value.startswith("auto"):
        log.warning("fastvlm: %s=%s is not supported; using %s", name, value, default)
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if number < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {number}")
    return number


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _flatten_visuals(visuals: Any) -> list:
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    out: list = []
    for v in visuals:
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            out.extend(x for x in v if x is not None)
        else:
            out.append(v)
    for v in out:
        if isinstance(v, dict):
            raise ImageError("fastvlm takes images only; this task gives audio or another non-image input")
        if isinstance(v, (str, os.PathLike)) and str(v).lower().endswith(_VIDEO_EXTS):
            raise ImageError(f"fastvlm takes images only; this task gives a video ({v})")
    return out


def _kwargs_key(gen_kwargs: Any) -> str:
    try:
        return json.dumps(gen_kwargs, sort_keys=True, default=str)
    except TypeError:
        return repr(gen_kwargs)


# ---------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------


class FastVLMLmms(_LmmsBase):
    """FastVLM behind lmms-eval's ``lmms`` interface (a "simple" model: it is given
    ``doc_to_visual`` and a text context and applies its own chat template)."""

    is_simple = True

    def __init__(
        self,
        pretrained: Optional[str] = None,
        device: Optional[str] = "auto",
        dtype: Optional[str] = "auto",
        image_size: Optional[int] = None,
        batch_size: Any = 8,
        max_new_tokens: Any = 256,
        system_prompt: Optional[str] = None,
        attention: str = "sdpa",
        max_rounds: Any = 32,
        progress: Any = True,
        max_batch_size: Any = None,  # lmms-eval passes it; there is no automatic batch size here
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ConfigError(
                f"unknown fastvlm model_args {sorted(kwargs)}; known: pretrained, device, dtype, image_size, "
                "batch_size, max_new_tokens, system_prompt, attention, max_rounds, progress"
            )
        if attention not in ("sdpa", "eager"):
            raise ConfigError(f"attention must be 'sdpa' or 'eager', got {attention!r}")
        self.batch_size_per_gpu = _as_int(batch_size, "batch_size", default=8)
        self.max_new_tokens = _as_int(max_new_tokens, "max_new_tokens", default=256)
        self.max_rounds = _as_int(max_rounds, "max_rounds", default=32)
        self.progress = _as_bool(progress)
        if system_prompt and os.path.isfile(str(system_prompt)):
            with open(str(system_prompt), encoding="utf-8") as f:
                system_prompt = f.read().strip()
        self.system_prompt = system_prompt or None
        self._warned: set[str] = set()

        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world > 1:  # one process per GPU (accelerate launch / torchrun): bind to the local GPU
            self._rank = int(os.environ.get("RANK", "0") or 0)
            self._world_size = world
            local = int(os.environ.get("LOCAL_RANK", "0") or 0)
            if device in (None, "", "auto", "cuda"):
                device = f"cuda:{local}"

        if model is None:
            from ...commands.common import bundled_model_path
            from ...model import FastVLM

            path = pretrained or bundled_model_path()
            if path is None:
                raise ConfigError("fastvlm: give model_args pretrained=PATH (this install has no bundled model)")
            model = FastVLM.from_pretrained(
                str(path), device=device or "auto", dtype=dtype or "auto",
                image_size=_as_int(image_size, "image_size", default=None),
            )
            model.set_attention_implementation(attention)
            if model.device.type != "mps":
                model.use_channels_last(True)
            self.pretrained = str(path)
        else:
            self.pretrained = pretrained
        if model.processor is None:
            raise ConfigError(f"{self.pretrained}: the checkpoint has no tokenizer files")
        self._model = model.eval()

    # -- lmms-eval conveniences ---------------------------------------------------------
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "FastVLMLmms":
        """lmms-eval's constructor path: ``model_args`` plus ``--batch_size``/``--device``.

        Unlike lmms-eval's default (which passes both and fails on a duplicate), a key
        given in ``model_args`` wins over the command-line option of the same name.
        """
        args = parse_arg_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    @property
    def model(self):
        return self._model

    @property
    def processor(self):
        return self._model.processor

    @property
    def tokenizer(self):
        return self._model.processor.tokenizer

    @property
    def device(self):
        return self._model.device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def eot_token_id(self) -> int:
        return self.processor.eos_token_ids[0]

    @property
    def max_length(self) -> int:
        return int(getattr(self._model.language_model.config, "max_position_embeddings", 32768) or 32768)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    def _progress(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not self.progress or self.rank != 0)

    # -- documents and prompts ----------------------------------------------------------
    def _doc(self, task: Any, split: Any, doc_id: Any):
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError) as e:
            raise ConfigError(f"fastvlm: no document {doc_id!r} in task_dict[{task!r}][{split!r}] ({e})") from None

    def _visuals(self, doc_to_visual: Optional[Callable], task: Any, split: Any, doc_id: Any) -> list:
        if doc_to_visual is None:
            return []
        return _flatten_visuals(doc_to_visual(self._doc(task, split, doc_id)))

    @staticmethod
    def _prompt(context: str, n_images: int) -> str:
        """The user text: placeholders kept when they match the images one to one, else
        removed (the images then go first)."""
        if not isinstance(context, str):
            raise PromptError(f"the context should be a string, got {type(context).__name__}")
        if context.count(IMAGE_PLACEHOLDER) == n_images:
            return context
        return context.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "")

    def _sampling(self, gen_kwargs: Optional[dict]) -> tuple[dict, list[str]]:
        """Our sampling arguments and the stop strings from lmms-eval ``gen_kwargs``."""
        gk = dict(gen_kwargs or {})
        until = gk.pop("until", None)
        if until is None:
            until = []
        elif isinstance(until, str):
            until = [until]
        elif isinstance(until, (list, tuple)):
            until = [str(u) for u in until]
        else:
            raise ConfigError(f"gen_kwargs['until'] should be a string or a list, got {type(until).__name__}")
        until = [u for u in until if u]
        max_new = _as_int(gk.pop("max_new_tokens", None), "max_new_tokens", default=self.max_new_tokens)
        temperature = gk.pop("temperature", None)
        temperature = 0.0 if temperature is None else float(temperature)
        do_sample = gk.pop("do_sample", None)
        do_sample = temperature > 0 if do_sample is None else _as_bool(do_sample)
        top_p = gk.pop("top_p", None)
        top_k = gk.pop("top_k", None)
        penalty = gk.pop("repetition_penalty", None)
        seed = gk.pop("seed", None)
        beams = gk.pop("num_beams", None)
        if beams is not None and int(beams) > 1:
            self._warn_once("beams", f"fastvlm: num_beams={beams} is not supported; decoding without beam search")
        for k in ("use_cache", "image_aspect_ratio", "image_sizes"):
            gk.pop(k, None)
        if gk:
            self._warn_once(f"ignored:{sorted(gk)}", f"fastvlm: ignoring generation arguments {sorted(gk)}")
        sampling = {
            "max_new_tokens": max_new,
            "do_sample": bool(do_sample),
            "temperature": (temperature if temperature > 0 else 1.0) if do_sample else 1.0,
            "top_p": float(top_p) if top_p is not None else 1.0,
            "top_k": int(top_k) if top_k is not None else 0,
            "repetition_penalty": float(penalty) if penalty is not None else 1.0,
            "seed": int(seed) if seed is not None and do_sample else None,  # greedy draws nothing
        }
        return sampling, until

    # -- generation ---------------------------------------------------------------------
    def generate_batch(self, requests: Sequence[tuple], sampling: dict, until: Sequence[str] = ()) -> list[str]:
        """Answer ``[(images, prompt), ...]`` in one batched decode, stopping each row at
        the end-of-turn token or as soon as its text holds a stop string (cut there)."""
        import torch

        from ...generation import eos_token_ids, build_batch_inputs, generate_steps

        model, processor = self._model, self.processor
        inputs = build_batch_inputs(processor, requests, system_prompt=self.system_prompt)
        prompt_len = int(inputs["input_ids"].shape[1])
        sampling = dict(sampling)
        room = self.max_length - prompt_len
        if room < 1:
            raise PromptError(f"the prompt is {prompt_len} tokens (images included); the model's context is "
                              f"{self.max_length}")
        sampling["max_new_tokens"] = min(sampling["max_new_tokens"], room)
        tok = processor.tokenizer
        eos = set(eos_token_ids(model, None))
        n = len(requests)
        ids: list[list[int]] = [[] for _ in range(n)]
        done = [False] * n
        with torch.inference_mode():
            for tokens, _finished, timings in generate_steps(model, **inputs, **sampling):
                model.last_timings = timings
                for i, t in enumerate(tokens.tolist()):
                    if done[i]:
                        continue
                    if t in eos:
                        done[i] = True
                        continue
                    ids[i].append(t)
                    if until:
                        text = tok.decode(ids[i], skip_special_tokens=True)
                        if any(s in text for s in until):
                            done[i] = True
                if all(done):
                    break
        out = []
        for row in ids:
            text = tok.decode(row, skip_special_tokens=True)
            for s in until:
                text = text.split(s)[0]
            out.append(text.strip())
        return out

    def generate_until(self, requests) -> list[str]:
        """Answers for ``generate_until`` requests, batched ``batch_size`` at a time among
        requests with the same generation arguments; in request order."""
        results: list[Optional[str]] = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        args = [r.args for r in requests]
        for i, a in enumerate(args):
            groups[_kwargs_key(a[1])].append(i)
        with self._progress(len(requests), "fastvlm generate_until") as bar:
            for idxs in groups.values():
                # longest contexts first: similar lengths share a batch, and memory errors show at once
                idxs = sorted(idxs, key=lambda i: (-len(args[i][0]), i))
                sampling, until = self._sampling(args[idxs[0]][1])
                for start in range(0, len(idxs), self.batch_size):
                    chunk = idxs[start : start + self.batch_size]
                    batch = []
                    for i in chunk:
                        context, _, doc_to_visual, doc_id, task, split = args[i][:6]
                        images = self._visuals(doc_to_visual, task, split, doc_id)
                        batch.append((images, self._prompt(context, len(images))))
                    answers = self.generate_batch(batch, sampling, until)
                    for i, a in zip(chunk, answers):
                        results[i] = a
                        self.cache_hook.add_partial("generate_until", (args[i][0], args[i][1]), a)
                    bar.update(len(chunk))
        return results  # type: ignore[return-value]

    def generate_until_multi_round(self, requests) -> list[list[str]]:
        """Multi-round requests, one at a time: round 0 answers the context; round k > 0
        asks ``doc_to_text(doc, previous_output=answers, round_idx=k,
        previous_round_info=info)`` for ``(visuals, context, terminal, answers, info)``
        and stops when ``terminal`` (or after ``max_rounds``). Each result is the list
        of the rounds' answers."""
        results = []
        with self._progress(len(requests), "fastvlm multi-round") as bar:
            for req in requests:
                context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args[:7]
                sampling, until = self._sampling(gen_kwargs)
                doc = self._doc(task, split, doc_id)
                visuals = _flatten_visuals(doc_to_visual(doc)) if doc_to_visual is not None else []
                rounds: list[str] = []
                info = None
                for k in range(self.max_rounds + 1):
                    if k > 0:
                        visuals, context, terminal, updated, info = doc_to_text(
                            doc, previous_output=list(rounds), round_idx=k, previous_round_info=info
                        )
                        if updated is not None:
                            rounds = list(updated)
                        if terminal:
                            break
                        if k == self.max_rounds:
                            self._warn_once("rounds", f"fastvlm: stopped a multi-round request after "
                                                      f"{self.max_rounds} rounds (model_args max_rounds)")
                            break
                        visuals = _flatten_visuals(visuals)
                    answer = self.generate_batch([(visuals, self._prompt(context, len(visuals)))], sampling, until)[0]
                    rounds.append(answer)
                results.append(rounds)
                self.cache_hook.add_partial("generate_until_multi_round", (req.args[0], gen_kwargs), rounds)
                bar.update(1)
        return results

    # -- log-likelihood -----------------------------------------------------------------
    def _encode_pair(self, prompt_text: str, continuation: str) -> tuple[list[int], list[int]]:
        processor = self.processor
        ctx = processor.tokenize(prompt_text)
        whole = processor.tokenize(prompt_text + continuation)
        if len(whole) > len(ctx) and whole[: len(ctx)] == ctx:
            return ctx, whole[len(ctx):]
        cont = list(processor.tokenizer(continuation, add_special_tokens=False)["input_ids"]) if continuation else []
        return ctx, cont

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """``(sum of the continuation's token log-probabilities given the context and
        images, whether greedy decoding would produce exactly those tokens)`` per request."""
        import torch

        from ...generation import _messages_from

        model, processor = self._model, self.processor
        entries = []
        for i, req in enumerate(requests):
            a = req.args
            if len(a) == 2:  # acc_mutual_info's unconditional requests: (context, continuation), no images
                context, target, doc_to_visual, key = a[0], a[1], None, None
                doc = None
            else:
                context, target, doc_to_visual, doc_id, task, split = a[:6]
                key = (task, split, doc_id)
                doc = self._doc(task, split, doc_id) if callable(target) else None
            if isinstance(target, str):
                continuation = target
            elif callable(target):
                continuation = target(doc)
                if isinstance(continuation, (list, tuple)):
                    continuation = continuation[0]
                continuation = str(continuation)
            else:
                continuation = str(target)
            entries.append((i, context, continuation, doc_to_visual, key))

        results: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        # requests of one document together (one image encoding for all its choices)
        order = sorted(range(len(entries)), key=lambda j: (str(entries[j][4]), j))
        with self._progress(len(requests), "fastvlm loglikelihood") as bar, torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = [entries[j] for j in order[start : start + self.batch_size]]
                features: dict[Any, Any] = {}
                rows = []
                for i, context, continuation, doc_to_visual, key in chunk:
                    if doc_to_visual is not None and key not in features:
                        images = self._visuals(doc_to_visual, *key)
                        features[key] = model.get_image_features(processor.process_images(images)) if images else None
                    feats = features.get(key) if doc_to_visual is not None else None
                    n_images = 0 if feats is None else int(feats.shape[0])
                    messages, _ = _messages_from([None] * n_images, self._prompt(context, n_images), self.system_prompt)
                    prompt_text = processor.apply_chat_template(messages, add_generation_prompt=True)
                    ctx_ids, cont_ids = self._encode_pair(prompt_text, continuation)
                    if len(ctx_ids) + len(cont_ids) > self.max_length:
                        raise PromptError(f"request {i}: {len(ctx_ids) + len(cont_ids)} tokens exceed the model's "
                                          f"context of {self.max_length}")
                    rows.append((i, ctx_ids, cont_ids, feats))
                scored = self._score_rows([(c, t, f) for _, c, t, f in rows])
                for (i, *_), res in zip(rows, scored):
                    results[i] = res
                    self.cache_hook.add_partial("loglikelihood", (requests[i].args[0], entries[i][2]), res)
                bar.update(len(chunk))
        return results  # type: ignore[return-value]

    def _score_rows(self, rows: Sequence[tuple[list[int], list[int], Any]]) -> list[tuple[float, bool]]:
        """Score ``(context ids, continuation ids, image features or None)`` rows in one
        left-padded forward pass."""
        import torch

        with torch.inference_mode():
            return self._score_rows_impl(rows)

    def _score_rows_impl(self, rows):
        import torch

        model = self._model
        out: list[Optional[tuple[float, bool]]] = [None] * len(rows)
        live = [k for k, (_, cont, _) in enumerate(rows) if cont]
        for k, (_, cont, _) in enumerate(rows):
            if not cont:
                out[k] = LoglikelihoodResult(0.0, True)  # an empty continuation: log 1, trivially greedy
        if not live:
            return out  # type: ignore[return-value]
        seqs = [rows[k][0] + rows[k][1] for k in live]
        width = max(len(s) for s in seqs)
        pad = self.processor.pad_token_id
        ids = torch.full((len(live), width), pad, dtype=torch.long)
        mask = torch.zeros((len(live), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s):] = 1
        feats = [rows[k][2] for k in live if rows[k][2] is not None]
        image_features = torch.cat(feats, 0) if feats else None
        keep = max(len(rows[k][1]) for k in live) + 1
        logits = model(input_ids=ids, attention_mask=mask, image_features=image_features, logits_to_keep=keep).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [B, keep, V]: positions width-keep .. width-1
        for r, k in enumerate(live):
            cont = torch.tensor(rows[k][1], dtype=torch.long, device=logprobs.device)
            c = len(cont)
            lp = logprobs[r, keep - c - 1 : keep - 1]  # the logits that predict the continuation's tokens
            total = float(lp.gather(-1, cont.unsqueeze(-1)).sum())
            greedy = bool((lp.argmax(-1) == cont).all())
            out[k] = LoglikelihoodResult(total, greedy)
        return out  # type: ignore[return-value]

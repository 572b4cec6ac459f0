"""The model side of an evaluation: ``predict_fn`` over :class:`FastVLM.chat_batch`, and
time-to-first-token (TTFT) bookkeeping.

:func:`make_predict_fn` answers a batch of :class:`~fastvlm.eval.tasks.Sample` with one
batched, greedy :meth:`FastVLM.chat_batch` call (images encoded together, left-padded
decoding) and records the batch's :class:`~fastvlm.generation.Timings` in a
:class:`TimingLog`. In a batch every request waits for the whole batch's prefill, so a
request's TTFT is its batch's ``ttft_s``; the log reports per-request statistics with
the batch size they were measured at.

The paper quotes TTFT for one request at a time (vision encoding + prefill + the first
token, batch 1). :func:`measure_batch1_ttft` measures exactly that on a few samples,
after a warm-up call, so the number is comparable whatever ``--batch-size`` the
evaluation used.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from ..errors import ImageError
from .tasks import Sample

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "TimingLog",
    "default_max_new_tokens",
    "make_predict_fn",
    "measure_batch1_ttft",
    "stats",
]

# Greedy answers are short for every supported task; these bound a rambling model.
# lmms-eval's own generation_kwargs: DocVQA 128 (its default template), ChartQA/GQA/ScienceQA-IMG 16
# (TextVQA sets none; POPE sets 128 but the label is read from the first words).
DEFAULT_MAX_NEW_TOKENS: dict[str, int] = {
    "textvqa": 16,
    "docvqa": 128,
    "chartqa": 16,
    "pope": 16,
    "gqa": 16,
    "scienceqa_img": 16,
    "llava": 32,
    "jsonl": 32,
    "synth": 32,
}


def default_max_new_tokens(task_name: str) -> int:
    return DEFAULT_MAX_NEW_TOKENS.get(task_name, 32)


def stats(values: Sequence[float], *, ndigits: int = 6) -> Optional[dict[str, Any]]:
    """n, mean, median, min, max, p90 (nearest rank) and stdev of ``values``; None when empty."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return None
    p90 = xs[min(len(xs) - 1, max(0, math.ceil(0.9 * len(xs)) - 1))]
    return {
        "n": len(xs),
        "mean": round(statistics.fmean(xs), ndigits),
        "median": round(statistics.median(xs), ndigits),
        "min": round(xs[0], ndigits),
        "max": round(xs[-1], ndigits),
        "p90": round(p90, ndigits),
        "stdev": round(statistics.stdev(xs), ndigits) if len(xs) > 1 else 0.0,
    }


@dataclass
class TimingLog:
    """Timings of every batched generate call made through a predict_fn."""

    batches: list[dict[str, Any]] = field(default_factory=list)

    def add(self, timings, batch_size: int) -> None:
        if timings is None:
            return
        self.batches.append(
            {
                "batch_size": int(batch_size),
                "ttft_s": float(timings.ttft_s),
                "encode_s": float(timings.encode_s),
                "prefill_s": float(timings.prefill_s),
                "decode_s": float(timings.decode_s),
                "new_tokens": int(timings.new_tokens),
                "prompt_tokens": int(timings.prompt_tokens),
                "decode_tokens_per_s": float(timings.decode_tokens_per_s),
            }
        )

    @property
    def n_requests(self) -> int:
        return sum(b["batch_size"] for b in self.batches)

    def per_request(self, key: str) -> list[float]:
        """``key`` of each batch repeated once per request in it."""
        return [b[key] for b in self.batches for _ in range(b["batch_size"])]

    def summary(self, batch_size: int) -> Optional[dict[str, Any]]:
        """Per-request TTFT statistics (and encode/prefill/decode) of the batched run;
        None when nothing was generated (e.g. every sample was resumed)."""
        if not self.batches:
            return None
        sizes = sorted({b["batch_size"] for b in self.batches})
        decode_rates = [b["decode_tokens_per_s"] for b in self.batches if b["decode_tokens_per_s"] > 0]
        total_decode = sum(b["decode_s"] for b in self.batches)
        return {
            "what": "per request: the TTFT of the batch it was answered in (image encoding + prefill + "
            "first token for the whole batch)",
            "batch_size": batch_size,
            "batch_sizes_seen": sizes,
            "n_requests": self.n_requests,
            "n_batches": len(self.batches),
            "ttft_s": stats(self.per_request("ttft_s")),
            "ttft_s_per_batch": stats([b["ttft_s"] for b in self.batches]),
            "encode_s_per_batch": stats([b["encode_s"] for b in self.batches]),
            "prefill_s_per_batch": stats([b["prefill_s"] for b in self.batches]),
            "decode_tokens_per_s_per_sequence": stats(decode_rates),
            "new_tokens_total": sum(b["new_tokens"] for b in self.batches),
            "decode_s_total": round(total_decode, 6),
        }


def _request(sample: Sample) -> tuple[list[str], str]:
    return list(sample.images), sample.prompt


def readable_samples(samples: Sequence[Sample], progress: bool = False) -> tuple[list[Sample], list[dict]]:
    """(the samples whose images all decode, [{"id", "error"} for the others])."""
    from tqdm.auto import tqdm

    from ..processing import load_image

    good, bad = [], []
    for s in tqdm(samples, desc="checking images", unit="sample", disable=not progress):
        try:
            for path in s.images:
                load_image(path).close()
        except ImageError as e:
            bad.append({"id": s.id, "error": str(e)})
        else:
            good.append(s)
    return good, bad


@contextlib.contextmanager
def _naming_bad_image_records(batch: Sequence[Sample]):
    """An ImageError inside names the first record of `batch` whose images do not load, and how to go on."""
    try:
        yield
    except ImageError as e:
        bad = readable_samples(batch)[1]
        record = f"record {bad[0]['id']!r}: " if bad else ""
        raise ImageError(f"{record}{e}; fix or remove that record, or pass --skip-bad, and run the same command "
                         "again (the predictions written so far are kept)") from None


def make_predict_fn(
    model,
    *,
    max_new_tokens: int,
    timing_log: Optional[TimingLog] = None,
    system_prompt: Optional[str] = None,
    **sampling: Any,
) -> Callable[[list[Sample]], list[str]]:
    """A runner ``predict_fn``: one greedy :meth:`chat_batch` call per batch.

    Each sample's images go before its prompt (``<image>\\n`` per image, the reference's
    layout); ``sampling`` overrides the greedy defaults (``do_sample=False``).
    """
    kwargs = {"max_new_tokens": int(max_new_tokens), "do_sample": False, **sampling}

    def predict_fn(batch: list[Sample]) -> list[str]:
        with _naming_bad_image_records(batch):
            answers = model.chat_batch([_request(s) for s in batch], system_prompt=system_prompt, **kwargs)
        if timing_log is not None:
            timing_log.add(model.last_timings, len(batch))
        return list(answers)

    return predict_fn


def measure_batch1_ttft(
    model,
    samples: Sequence[Sample],
    *,
    n: int = 5,
    warmup: int = 1,
    system_prompt: Optional[str] = None,
) -> Optional[dict[str, Any]]:
    """TTFT of single requests (batch 1) on the first ``n`` samples, as the paper measures it.

    ``warmup`` untimed calls on the first sample come first (kernel selection, allocator,
    lazy initialisation). Each timed call generates one token; its TTFT is image encoding
    + projector + prefill + choosing the first token. Returns statistics in seconds plus
    the encode/prefill split, or None when ``n`` is 0 or there are no samples.
    """
    chosen = list(samples)[: max(0, n)]
    if not chosen:
        return None
    for _ in range(max(0, warmup)):
        with _naming_bad_image_records(chosen[:1]):
            model.chat(*_request(chosen[0]), system_prompt=system_prompt, max_new_tokens=1, do_sample=False)
    ttft, encode, prefill, tokens = [], [], [], []
    for s in chosen:
        with _naming_bad_image_records([s]):
            model.chat(*_request(s), system_prompt=system_prompt, max_new_tokens=1, do_sample=False)
        t = model.last_timings
        ttft.append(t.ttft_s)
        encode.append(t.encode_s)
        prefill.append(t.prefill_s)
        tokens.append(t.prompt_tokens)
    return {
        "what": "one request at a time (batch 1): image encoding + projector + prefill + first token",
        "batch_size": 1,
        "warmup": max(0, warmup),
        "sample_ids": [s.id for s in chosen],
        "ttft_s": stats(ttft),
        "encode_s": stats(encode),
        "prefill_s": stats(prefill),
        "prompt_tokens": stats(tokens, ndigits=1),
    }

"""The batching engine: one background thread owns the model and runs every generation.

Requests are prepared (images decoded and preprocessed, prompt tokenized) by the HTTP
handlers, then put on a bounded queue. The engine thread takes the first waiting
request, waits up to a short batching window for more that can share its batch (same
sampling settings, fitting the context together; a request that arrived within the
window but whose image is still being decoded is waited for, up to `prepare_wait_s`
more), and runs them as one
``generate_steps`` call: the images of the whole batch are encoded together, the
prompts are left-padded and decoded together. Each request stops receiving tokens when
it reaches its own ``max_tokens``, an end-of-sequence token or a stop string, or when
its client goes away; the batch goes on for the others, and the generator is closed as
soon as no request in the batch is still listening. Requests that arrive while a batch
runs wait for the next batch.

Greedy results do not depend on batching (left padding is masked and every row gets
the positions it would have alone). A sampled request with a ``seed`` runs in a batch of
its own so that the same seed gives the same answer.

Events go back to the handler's asyncio loop with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

log = logging.getLogger("fastvlm.serve")


class QueueFull(Exception):
    """The request queue is at its bound."""


class EngineStopped(Exception):
    """The engine is not running (shutting down, or failed)."""


@dataclass(frozen=True)
class Sampling:
    """Per-request sampling settings, in generate_steps' terms."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def batch_key(self, unique: Any) -> tuple:
        """Requests with equal keys may share a batch."""
        if self.greedy:
            return ("greedy", self.repetition_penalty)
        if self.seed is not None:
            return ("seeded", unique)  # alone, so the seed means what it says
        return ("sample", self.temperature, self.top_p, self.top_k, self.repetition_penalty)

    def kwargs(self, max_new_tokens: int) -> dict:
        return dict(
            max_new_tokens=max_new_tokens,
            do_sample=not self.greedy,
            temperature=self.temperature if not self.greedy else 1.0,
            top_p=self.top_p if not self.greedy else 1.0,
            top_k=self.top_k if not self.greedy else 0,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed if not self.greedy else None,  # greedy decoding draws nothing
        )


class _TextState:
    """Incremental detokenization with stop strings.

    Decodes a sliding window of ids (as TGI and vLLM do) so the cost per token is
    constant, holds back a trailing incomplete UTF-8 character and any tail that could
    be the start of a stop string, and drops leading whitespace of the answer.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]):
        self._decode = decode
        self.stop = stop
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self.raw = ""  # everything decoded so far
        self.sent = 0  # characters of `text` already emitted
        self.stopped = False

    @property
    def text(self) -> str:
        return self.raw.lstrip()

    def _unsent(self) -> tuple[int, int]:
        """(lead, start): leading whitespace in `raw`, and where in `raw` the unsent characters begin.

        Stop strings are matched in `raw`, so one inside the leading whitespace (a newline stop string when
        the answer starts with a newline) still stops the answer, as OpenAI's and vLLM's stop do; only the
        output drops that whitespace.
        """
        lead = len(self.raw) - len(self.text)
        return lead, (lead + self.sent if self.sent else 0)

    def add(self, token: int) -> None:
        self.ids.append(token)
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.raw += new_text[len(prefix_text):]
            self._prefix = self._read
            self._read = len(self.ids)
        if self.stop:
            _, start = self._unsent()
            # a stop string can only newly appear in the unsent tail
            for s in self.stop:
                i = self.raw.find(s, max(0, start - len(s)))
                if i != -1:
                    self.raw = self.raw[:i]
                    self.stopped = True
                    break

    def flush_tail(self) -> None:
        """At the end, anything still held back as an incomplete character is decoded as is."""
        if self._read < len(self.ids):
            prefix_text = self._decode(self.ids[self._prefix:self._read])
            new_text = self._decode(self.ids[self._prefix:])
            if len(new_text) > len(prefix_text):
                self.raw += new_text[len(prefix_text):]
            self._read = len(self.ids)

    def take(self, final: bool) -> str:
        """The text not yet emitted, minus what must still be held back (unless final)."""
        lead, start = self._unsent()
        end = len(self.raw)
        if not final and self.stop:
            hold = 0
            for s in self.stop:
                for k in range(min(len(s) - 1, end - start), 0, -1):
                    if s.startswith(self.raw[end - k:]):
                        hold = max(hold, k)
                        break
            end -= hold
        piece = self.raw[lead + self.sent:end] if end > lead + self.sent else ""
        self.sent += len(piece)
        return piece


@dataclass
class Job:
    """One prepared request, owned by the engine once submitted."""

    input_ids: list[int]
    pixel_values: Any  # [n_images, 3, S, S] float32 tensor or None
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    emit: Callable[[tuple], None] = lambda event: None  # called from the engine thread
    events: Any = None  # the consumer's end (an asyncio.Queue in the server); unused by the engine
    t_arrival: float = field(default_factory=time.perf_counter)
    id: int = field(default_factory=itertools.count().__next__)
    # engine-side state
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: bool = False
    n_generated: int = 0
    t_start: float = 0.0
    t_first: float = 0.0
    t_last: float = 0.0
    finish_reason: Optional[str] = None
    # "new", then "queued" (submitted; counts against the queue bound), then "running" or "dropped"
    # (cancelled before it ran); changed under the engine's lock
    state: str = field(default="new", repr=False)
    _on_cancel: Optional[Callable[["Job"], None]] = field(default=None, repr=False)

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)

    def cancel(self) -> None:
        """Stop this job: a queued one leaves the queue (and frees its place) at once, a running one at its
        batch's next step."""
        self.cancelled.set()
        if self._on_cancel is not None:
            self._on_cancel(self)


class Engine:
    """Owns the model; `submit` jobs from any thread, get events through each job's `emit`.

    Events: ``("delta", text)``, ``("done", finish_reason, usage, timings)``, ``("error", exc)``.
    Exactly one of "done" or "error" ends every job that was not cancelled.
    """

    def __init__(self, model, *, max_batch_size: int = 8, max_queue: int = 64, batch_window_s: float = 0.01,
                 prepare_wait_s: float = 0.2):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self.model = model
        self.processor = model.processor
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_window_s = batch_window_s
        self.tokenizer_lock = threading.Lock()  # the engine's own tokenizer; requests tokenize with a copy
        # Unbounded underneath: the bound is `_waiting`, which also counts jobs set aside
        # (deferred) because they could not join the batch being formed.
        self._queue: queue.Queue[Job] = queue.Queue()
        self._waiting = 0
        self._lock = threading.Lock()
        self._preparing: dict[int, float] = {}
        self._prep_ids = itertools.count()
        self.prepare_wait_s = prepare_wait_s
        self._deferred: collections.deque[Job] = collections.deque()
        self._running = threading.Event()
        self._unpaused = threading.Event()
        self._unpaused.set()
        self._thread: Optional[threading.Thread] = None
        self.active: list[Job] = []
        self.error: Optional[BaseException] = None
        self.stats = collections.Counter()
        self.context = int(getattr(model.language_model.config, "max_position_embeddings", 0) or 0) or None
        from ..generation import eos_token_ids

        self.eos_ids = frozenset(eos_token_ids(model, None))

    # ------------------------------------------------------------------ control
    def start(self, warmup: Optional[Callable[[], None]] = None) -> "Engine":
        """Start the engine thread; `warmup` runs first, in that thread (CUDA libraries set up
        per-thread state on first use, so warming up in another thread does not help), and
        start returns once it is done."""
        if self._thread is not None:
            return self
        self._running.set()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(warmup, ready), name="fastvlm-engine",
                                        daemon=True)
        self._thread.start()
        ready.wait()
        if self.error is not None:
            raise EngineStopped(f"the engine failed to start: {self.error}") from self.error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._running.clear()
        self._unpaused.set()
        for job in list(self.active):  # end the running batch at its next step
            self._end_stopped(job)
        if self._thread is not None:
            self._thread.join(timeout)
        # Anything still waiting will never run.
        for job in self._drain():
            self._end_stopped(job)

    @staticmethod
    def _end_stopped(job: Job) -> None:
        if not job.done:
            job.done = True
            job.emit(("error", EngineStopped("the server is shutting down")))
        job.cancel()

    def pause(self) -> None:
        """Stop taking new batches (the running one finishes). For tests and maintenance."""
        self._unpaused.clear()

    def resume(self) -> None:
        self._unpaused.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._running.is_set()

    def queued(self) -> int:
        """Requests submitted and not yet running (nor dropped)."""
        return self._waiting

    def is_full(self) -> bool:
        return self._waiting >= self.max_queue

    def submit(self, job: Job) -> None:
        if not self.alive:
            raise EngineStopped("the generation engine is not running")
        with self._lock:
            if self._waiting >= self.max_queue:
                self.stats["rejected_queue_full"] += 1
                raise QueueFull(f"the server is busy: {self.max_queue} requests are already waiting")
            self._waiting += 1
            self.stats["submitted"] += 1
            job.state = "queued"
            job._on_cancel = self._dropped
        self._queue.put_nowait(job)
        if job.cancelled.is_set():  # cancelled while being submitted
            self._dropped(job)

    def _dropped(self, job: Job) -> None:
        """A job cancelled before it ran leaves the queue's count at once (from the canceller's thread); the
        engine skips it when it comes out of the queue."""
        with self._lock:
            if job.state != "queued":
                return
            job.state = "dropped"
            self._waiting -= 1
            self.stats["cancelled_while_queued"] += 1

    def _started(self, batch: list[Job]) -> list[Job]:
        """The jobs of `batch` not cancelled meanwhile, now running (they leave the queue's count)."""
        with self._lock:
            for job in batch:
                if job.state == "queued":
                    job.state = "running"
                    self._waiting -= 1
            return [job for job in batch if job.state == "running"]

    def _drain(self) -> list[Job]:
        jobs = list(self._deferred)
        self._deferred.clear()
        while True:
            try:
                jobs.append(self._queue.get_nowait())
            except queue.Empty:
                return jobs

    # ------------------------------------------------------------------ batching
    def _fits(self, batch: list[Job], job: Job) -> bool:
        if job.sampling.batch_key(job.id) != batch[0].sampling.batch_key(batch[0].id):
            return False
        if self.context is None:
            return True
        width = max(max(j.prompt_tokens for j in batch), job.prompt_tokens)
        steps = max(max(j.max_tokens for j in batch), job.max_tokens)
        return width + steps <= self.context

    def _take(self, timeout: float) -> Optional[Job]:
        """The next live job: deferred ones first, then the queue."""
        while self._deferred:
            job = self._deferred.popleft()
            if not job.cancelled.is_set():
                return job
            self._dropped(job)
        try:
            while True:
                job = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
                if not job.cancelled.is_set():
                    return job
                self._dropped(job)
        except queue.Empty:
            return None

    def _next_batch(self) -> list[Job]:
        """The first waiting job plus every compatible one that is queued, arrives within the
        batching window, or arrived before the window closed but is still being prepared
        (its image decoded and resized), up to max_batch_size."""
        first = self._take(0.1)
        if first is None:
            return []
        batch = [first]
        keep: collections.deque[Job] = collections.deque()
        while self._deferred and len(batch) < self.max_batch_size:
            job = self._deferred.popleft()
            if job.cancelled.is_set():
                self._dropped(job)
            elif self._fits(batch, job):
                batch.append(job)
            else:
                keep.append(job)
        keep.extend(self._deferred)
        self._deferred = keep
        t0 = time.perf_counter()
        deadline = t0 + self.batch_window_s
        hard_deadline = deadline + self.prepare_wait_s
        while len(batch) < self.max_batch_size:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                now = time.perf_counter()
                if now < deadline:
                    wait = deadline - now
                elif now < hard_deadline and self._preparing_since(deadline):
                    wait = min(0.002, hard_deadline - now)
                else:
                    break
                try:
                    job = self._queue.get(timeout=wait)
                except queue.Empty:
                    continue
            if job.cancelled.is_set():
                self._dropped(job)
            elif self._fits(batch, job):
                batch.append(job)
            else:
                self._deferred.append(job)
        return batch

    # ------------------------------------------------------------------ requests being prepared
    @contextlib.contextmanager
    def preparing(self, t_arrival: float):
        """Wrap a request's preparation (image decoding, tokenization) up to `submit`, so a
        batch being formed can wait for requests that arrived in its window but are not ready."""
        token = next(self._prep_ids)
        with self._lock:
            self._preparing[token] = t_arrival
        try:
            yield
        finally:
            with self._lock:
                self._preparing.pop(token, None)

    def _preparing_since(self, t: float) -> bool:
        with self._lock:
            return any(arrival <= t for arrival in self._preparing.values())

    # ------------------------------------------------------------------ running
    def _loop(self, warmup: Optional[Callable[[], None]] = None,
              ready: Optional[threading.Event] = None) -> None:
        import torch

        try:
            with torch.inference_mode():
                try:
                    if warmup is not None:
                        t = time.perf_counter()
                        warmup()
                        log.info("warm-up took %.1f s", time.perf_counter() - t)
                except BaseException as e:
                    self.error = e
                    self._running.clear()
                    log.exception("warm-up failed")
                    return
                finally:
                    if ready is not None:
                        ready.set()
                while self._running.is_set():
                    if not self._unpaused.wait(0.1):
                        continue
                    batch = self._next_batch()
                    if not batch:
                        continue
                    if not self._unpaused.is_set():  # paused while the batch was forming: put it back
                        self._deferred.extendleft(reversed(batch))
                        continue
                    batch = self._started(batch)
                    if not batch:
                        continue
                    self.active = batch
                    # `stop` clears _running, then ends the jobs in `active`: a batch formed while it ran is
                    # ended here (a job may get both, and its handler reads the first)
                    if not self._running.is_set():
                        for job in batch:
                            self._end_stopped(job)
                        self.active = []
                        break
                    try:
                        self._run_batch(batch)
                    except Exception as e:  # noqa: BLE001 - reported to every request of the batch
                        log.exception("generation failed for a batch of %d", len(batch))
                        self.stats["batch_errors"] += 1
                        for job in batch:
                            if not job.done:
                                job.done = True
                                job.emit(("error", e))
                    finally:
                        self.active = []
        except BaseException as e:  # pragma: no cover - the thread must not die silently
            self.error = e
            log.exception("the generation engine stopped")
            raise

    def _decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.processor.tokenizer.decode(ids, skip_special_tokens=True)

    def _run_batch(self, batch: list[Job]) -> None:
        import torch

        from ..generation import generate_steps

        t_start = time.perf_counter()
        pad = self.processor.pad_token_id
        width = max(j.prompt_tokens for j in batch)
        ids = torch.tensor([[pad] * (width - j.prompt_tokens) + j.input_ids for j in batch], dtype=torch.long)
        mask = torch.tensor([[0] * (width - j.prompt_tokens) + [1] * j.prompt_tokens for j in batch],
                            dtype=torch.long)
        pixels = [j.pixel_values for j in batch if j.pixel_values is not None and len(j.pixel_values)]
        pixel_values = torch.cat(pixels) if pixels else None
        max_new = max(j.max_tokens for j in batch)
        states = {}
        for j in batch:
            j.t_start = t_start
            states[j.id] = _TextState(self._decode, j.stop)
        self.stats["batches"] += 1
        self.stats["batched_requests"] += len(batch)
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(batch))

        # End-of-sequence is handled here per request (ignore_eos, stop strings), so the
        # generator is told about an id that never occurs.
        steps = generate_steps(self.model, ids, mask, pixel_values, eos_token_id=-1,
                               **batch[0].sampling.kwargs(max_new))
        batch_timings = None
        try:
            for tokens, _finished, timings in steps:
                now = time.perf_counter()
                batch_timings = timings
                toks = tokens.tolist()
                live = 0
                for row, job in enumerate(batch):
                    if job.done:
                        continue
                    if job.cancelled.is_set():
                        job.done = True
                        self.stats["cancelled_while_running"] += 1
                        continue
                    self._advance(job, states[job.id], toks[row], now, timings, len(batch))
                    live += not job.done
                if live == 0:
                    break
        finally:
            steps.close()  # stops the work if we left early
        for job in batch:
            if not job.done:  # the generator ended first (cannot happen unless it stops early)
                self._finish(job, states[job.id], "length", batch_timings, len(batch))

    def _advance(self, job: Job, state: _TextState, token: int, now: float, timings, batch_size: int) -> None:
        job.n_generated += 1
        if job.n_generated == 1:
            job.t_first = now
        job.t_last = now
        if token in self.eos_ids and not job.ignore_eos:
            self._finish(job, state, "stop", timings, batch_size)
            return
        state.add(token)
        if state.stopped:
            self._finish(job, state, "stop", timings, batch_size)
            return
        if job.n_generated >= job.max_tokens:
            self._finish(job, state, "length", timings, batch_size)
            return
        piece = state.take(final=False)
        if piece:
            job.emit(("delta", piece))

    def _finish(self, job: Job, state: _TextState, reason: str, timings, batch_size: int) -> None:
        if not state.stopped:
            state.flush_tail()
        piece = state.take(final=True)
        if piece:
            job.emit(("delta", piece))
        job.done = True
        job.finish_reason = reason
        self.stats["completed"] += 1
        usage = {
            "prompt_tokens": job.prompt_tokens,
            "completion_tokens": job.n_generated,
            "total_tokens": job.prompt_tokens + job.n_generated,
        }
        decode_s = job.t_last - job.t_first
        t = {
            "ttft_s": job.t_first - job.t_arrival,  # request received -> first token chosen
            "queue_s": job.t_start - job.t_arrival,  # received -> its batch started (includes preprocessing)
            "encode_s": getattr(timings, "encode_s", 0.0),  # the batch's image encoding
            "prefill_s": getattr(timings, "prefill_s", 0.0),  # the batch's prefill
            "decode_s": decode_s,
            "decode_tokens_per_s": (job.n_generated - 1) / decode_s if job.n_generated > 1 and decode_s > 0 else 0.0,
            "total_s": time.perf_counter() - job.t_arrival,
            "batch_size": batch_size,
        }
        job.emit(("done", reason, usage, t))

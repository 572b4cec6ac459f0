"""The FastAPI application: routes, limits, authentication and OpenAI-style errors.

`create_app(model, settings)` builds the app around a loaded model; the engine thread
starts with the app (lifespan) and stops with it. This module imports FastAPI at the top
(route annotations must resolve); the CLI imports it only when serving.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any, AsyncIterator, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, EngineStopped, Job, QueueFull, Sampling
from .images import ImageLimits, image_bytes
from .protocol import (
    APIError,
    ChatCompletionRequest,
    bad_request,
    chunk,
    completion_response,
    error_body,
    model_card,
    new_completion_id,
    now,
    validation_error_to_api_error,
)

log = logging.getLogger("fastvlm.serve")


@dataclass
class ServeSettings:
    """Everything configurable about the server (the CLI flags map onto these)."""

    model_name: str = "fastvlm"
    api_key: Optional[str] = None
    max_request_bytes: int = 32 * 2**20
    max_image_bytes: int = 16 * 2**20
    max_image_pixels: int = 50_000_000
    max_images_per_request: int = 4
    max_prompt_tokens: Optional[int] = None  # None: the model's context minus one
    max_tokens_limit: int = 4096
    default_max_tokens: int = 512
    default_temperature: float = 0.0
    max_stop: int = 4
    max_batch_size: int = 8
    max_queue: int = 64
    batch_window_ms: float = 10.0
    # How much longer a forming batch may wait for requests that arrived within the window
    # but are still being prepared (image decoding and resizing).
    prepare_wait_ms: float = 200.0
    allow_remote_images: bool = False
    remote_image_timeout_s: float = 10.0
    remote_image_max_redirects: int = 3
    body_timeout_s: float = 60.0  # the longest pause between pieces of a request body (408 after it)
    # Browser pages on these origins may call the API (CORS); empty: only same-origin pages (the bundled one).
    allowed_origins: tuple[str, ...] = ()


def _static_dir() -> str:
    return str(resources.files("fastvlm.serve") / "static")


async def read_body(request, limit: int, timeout_s: Optional[float] = None) -> bytes:
    """The request body, refusing (413) more than `limit` bytes without reading past it, and (408) a body
    that stalls: no bytes for `timeout_s` seconds (a stalled client holds its memory and socket). A slow upload
    that keeps moving is not cut, whatever its total time."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request("invalid Content-Length header")
        if int(declared) > limit:
            raise APIError(413, f"request body is {declared} bytes, more than the limit of {limit} bytes",
                           code="request_too_large")
    from starlette.requests import ClientDisconnect

    buf = bytearray()

    pieces = request.stream().__aiter__()
    try:
        while True:
            try:
                piece = await asyncio.wait_for(pieces.__anext__(), timeout_s)
            except StopAsyncIteration:
                break
            buf.extend(piece)
            if len(buf) > limit:
                raise APIError(413, f"request body is more than the limit of {limit} bytes",
                               code="request_too_large")
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body stalled: no bytes for {timeout_s:g} s ({len(buf)} bytes came)",
                       code="request_timeout", headers={"Connection": "close"}) from None
    except ClientDisconnect:  # the client left while sending: nobody to answer, nothing to log
        raise APIError(400, "the client disconnected while sending the request",
                       code="client_disconnected") from None
    return bytes(buf)


class _Prepared:
    __slots__ = ("input_ids", "pixel_values", "n_images")

    def __init__(self, input_ids, pixel_values, n_images):
        self.input_ids = input_ids
        self.pixel_values = pixel_values
        self.n_images = n_images


def create_app(model, settings: Optional[ServeSettings] = None, *, engine: Optional[Engine] = None,
               warmup: Optional[Callable[[], None]] = None):
    """The app serving `model`; `warmup` (optional) runs in the engine thread before requests are taken."""
    from ..errors import FastVLMError, ImageTooLargeError
    from ..processing import IMAGE_TOKEN, check_padded_size, load_image, preprocess_images

    settings = settings or ServeSettings()
    processor = model.processor
    if processor is None:
        raise ValueError("the model has no processor (tokenizer); the server needs one")
    engine = engine or Engine(model, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
                              batch_window_s=settings.batch_window_ms / 1000.0,
                              prepare_wait_s=settings.prepare_wait_ms / 1000.0)
    # Requests tokenize with one copy of the tokenizer, behind its own lock (a fast tokenizer is not safe to
    # share between threads), so a long prompt being tokenized never holds up the engine's per-token decoding.
    import copy

    request_processor = copy.copy(processor)
    request_processor.tokenizer = copy.deepcopy(processor.tokenizer)
    tokenizer_lock = threading.Lock()
    vocab = processor.tokenizer.get_vocab()
    # byte-level BPE: a token's vocabulary string has one character per byte, so no token covers more characters
    max_token_chars = max((len(t) for t in vocab), default=1) or 1
    control_tokens = sorted({t for t in getattr(processor.tokenizer, "all_special_tokens", [])}
                            | {t for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>") if t in vocab})
    context = engine.context
    max_prompt = settings.max_prompt_tokens or ((context - 1) if context else 1 << 30)
    limits = ImageLimits(max_bytes=settings.max_image_bytes, allow_remote=settings.allow_remote_images,
                         remote_timeout_s=settings.remote_image_timeout_s,
                         max_redirects=settings.remote_image_max_redirects)
    created = now()

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        await run_in_threadpool(engine.start, warmup)
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    # With an API key nothing is served without it: no /docs page and no /openapi.json schema either.
    docs = not settings.api_key
    app = FastAPI(title="fastvlm serve", version="1", lifespan=lifespan, docs_url="/docs" if docs else None,
                  openapi_url="/openapi.json" if docs else None, redoc_url=None)
    app.state.engine = engine
    app.state.settings = settings
    app.state.model = model
    if settings.allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        # answers preflight (OPTIONS) requests itself, before the API key is asked for, as browsers send none there;
        # any request header (OpenAI's browser SDK sends x-stainless-* ones); no cookies: the key is a bearer token
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins),
                           allow_methods=["GET", "POST"], allow_headers=["*"], max_age=600)

    # ------------------------------------------------------------------ errors
    def error_response(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        # FastAPI's own validation (422) answered as OpenAI does: 400 with the error shape.
        errs = e.errors()
        parts = [f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg', 'invalid')}" for err in errs[:4]]
        param = ".".join(str(x) for x in errs[0].get("loc", ())) if errs else None
        return error_response(bad_request("invalid request: " + "; ".join(parts), param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(error_body(str(e.detail), type="invalid_request_error", code=kind),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body("internal server error", type="server_error", code="internal_error"),
                            status_code=500)

    # ------------------------------------------------------------------ auth
    def check_auth(request: Request) -> None:
        if not settings.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else ""
        # compare_digest on bytes of any length; both sides encoded so non-ASCII cannot raise.
        if not given or not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'"
                           if not given else "invalid API key", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    # ------------------------------------------------------------------ pages and metadata
    # The page runs only its own script and style, and talks only to this server; images are data: URIs.
    page_headers = {
        "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                                   "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    }

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index():
        return FileResponse(f"{_static_dir()}/index.html", media_type="text/html", headers=page_headers)

    app.mount("/static", StaticFiles(directory=_static_dir()), name="static")

    @app.get("/health")
    async def health():
        ok = engine.alive
        body = {"status": "ok" if ok else "unavailable", "model": settings.model_name,
                "queued": engine.queued(), "running": len(engine.active),
                "max_batch_size": engine.max_batch_size, "max_queue": engine.max_queue}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [model_card(settings.model_name, created, **_model_meta())]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request):
        check_auth(request)
        if name != settings.model_name:
            raise APIError(404, f"the model {name!r} does not exist (this server serves {settings.model_name!r})",
                           param="model", code="model_not_found")
        return model_card(settings.model_name, created, **_model_meta())

    def _model_meta() -> dict:
        return {
            "device": str(model.device),
            "dtype": str(model.dtype).replace("torch.", ""),
            "max_model_len": context,
            "image_size": model.config.image_size,
            "image_tokens": model.num_image_tokens,
            "limits": {
                "max_request_bytes": settings.max_request_bytes,
                "max_images_per_request": settings.max_images_per_request,
                "max_image_bytes": settings.max_image_bytes,
                "max_image_pixels": settings.max_image_pixels,
                "max_prompt_tokens": max_prompt,
                "max_tokens": settings.max_tokens_limit,
                "remote_images": settings.allow_remote_images,
            },
        }

    # ------------------------------------------------------------------ chat completions
    async def prepare(req: ChatCompletionRequest) -> tuple[list[dict], list[bytes]]:
        """HF-style messages for the chat template, and the encoded bytes of each image in order."""
        messages: list[dict] = []
        urls: list[tuple[str, str]] = []
        for i, m in enumerate(req.messages):
            role = "system" if m.role == "developer" else m.role
            if isinstance(m.content, str):
                messages.append({"role": role, "content": m.content})
                continue
            parts = []
            for j, part in enumerate(m.content):
                if part.type in ("text", "refusal"):
                    parts.append({"type": "text", "text": part.text})
                else:
                    if role != "user":
                        raise bad_request(f"images are only allowed in user messages (message {i} is {m.role!r})",
                                          param=f"messages[{i}].content[{j}]")
                    urls.append((part.url, f"messages[{i}].content[{j}].image_url"))
                    parts.append({"type": "image"})
            messages.append({"role": role, "content": parts})
        if len(urls) > settings.max_images_per_request:
            raise bad_request(f"{len(urls)} images in the request, more than the limit of "
                              f"{settings.max_images_per_request}", param="messages", code="too_many_images")
        blobs = [await image_bytes(url, limits, param) for url, param in urls]
        return messages, [(b, p) for b, (_, p) in zip(blobs, urls, strict=True)]

    def process(messages: list[dict], blobs: list[tuple[bytes, str]]) -> _Prepared:
        """Decode and preprocess the images, render and tokenize the prompt (in a worker thread)."""
        images = []
        for data, param in blobs:
            try:
                image = load_image(data, max_pixels=settings.max_image_pixels)
                check_padded_size(image, processor.image_aspect_ratio, settings.max_image_pixels, "the image",
                                  image_size=processor.image_size)
                images.append(image)
            except FastVLMError as e:
                hint = " (the server's --max-image-pixels)" if isinstance(e, ImageTooLargeError) else ""
                raise bad_request(f"invalid image: {e}{hint}", param=param, code="invalid_image") from None
        for i, m in enumerate(messages):
            texts = [m["content"]] if isinstance(m["content"], str) else \
                [p.get("text", "") for p in m["content"] if isinstance(p, dict)]
            for text in texts:
                found = [t for t in control_tokens if t in text]
                if found:  # they would end the turn and open others: refused, as the API's roles are the turns
                    raise bad_request(f"messages[{i}] contains the control token(s) {', '.join(found)}, which this "
                                      "server does not take in text", param=f"messages[{i}].content")
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise bad_request(f"messages[{i}] is not valid Unicode text (a lone surrogate)",
                                      param=f"messages[{i}].content") from None
        try:
            prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        except FastVLMError as e:
            raise bad_request(str(e), param="messages") from None
        if prompt.count(IMAGE_TOKEN) != len(images):
            raise bad_request(f"the text contains the reserved string {IMAGE_TOKEN!r}; send images as image_url "
                              "parts instead", param="messages")
        text_chars = len(prompt) - len(IMAGE_TOKEN) * len(images)
        if text_chars > max_prompt * max_token_chars:  # more tokens than the limit, whatever the tokenizer does
            raise bad_request(f"the prompt is {text_chars} characters, more than the limit of {max_prompt} tokens "
                              "could hold", param="messages", code="context_length_exceeded")
        with tokenizer_lock:
            ids = request_processor.tokenize(prompt)
        if len(ids) > max_prompt:
            raise bad_request(f"the prompt is {len(ids)} tokens (images included), more than the limit of "
                              f"{max_prompt}", param="messages", code="context_length_exceeded")
        pixel_values = (preprocess_images(images, processor.image_size, processor.image_aspect_ratio)
                        if images else None)
        return _Prepared(ids, pixel_values, len(images))

    def parse_request(body: bytes) -> ChatCompletionRequest:
        try:
            obj = json.loads(body.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None
        except RecursionError:
            raise bad_request("the request body nests JSON too deeply", code="invalid_json") from None
        except ValueError as e:  # e.g. an integer of more digits than Python converts
            raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(obj, dict):
            raise bad_request(f"the request body must be a JSON object, got {type(obj).__name__}",
                              code="invalid_json")
        try:
            req = ChatCompletionRequest.model_validate(obj)
        except ValidationError as e:
            raise validation_error_to_api_error(e) from None
        req.check_supported()
        return req

    def choose_max_tokens(req: ChatCompletionRequest, n_prompt: int) -> int:
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        room = (context - n_prompt) if context else None
        if asked is None:
            n = settings.default_max_tokens if room is None else min(settings.default_max_tokens, room)
            if n < 1:
                raise bad_request(f"the prompt ({n_prompt} tokens) leaves no room in the model's context of "
                                  f"{context} tokens", param="messages", code="context_length_exceeded")
            return n
        if asked > settings.max_tokens_limit:
            raise bad_request(f"{param}={asked} is more than this server's limit of {settings.max_tokens_limit}",
                              param=param)
        if room is not None and asked > room:
            raise bad_request(f"the prompt ({n_prompt} tokens, images included) plus {param}={asked} is more "
                              f"than the model's context of {context} tokens", param=param,
                              code="context_length_exceeded")
        return asked

    async def build_job(req: ChatCompletionRequest, stop: list[str], t_arrival: float) -> Job:
        messages, blobs = await prepare(req)
        prepared = await run_in_threadpool(process, messages, blobs)
        max_tokens = choose_max_tokens(req, len(prepared.input_ids))
        temperature = settings.default_temperature if req.temperature is None else req.temperature
        sampling = Sampling(temperature=temperature, top_p=1.0 if req.top_p is None else req.top_p,
                            top_k=req.top_k or 0,
                            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                            seed=req.seed)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event: tuple) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        job = Job(input_ids=prepared.input_ids, pixel_values=prepared.pixel_values, max_tokens=max_tokens,
                  sampling=sampling, stop=stop, ignore_eos=req.ignore_eos, emit=emit, t_arrival=t_arrival,
                  events=events)
        return job

    def busy_error(msg: str) -> APIError:
        return APIError(429, msg, type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        t_arrival = time.perf_counter()
        check_auth(request)
        body = await read_body(request, settings.max_request_bytes, settings.body_timeout_s or None)
        # a large body (base64 images, many parts) takes seconds to parse and validate: not on the event loop,
        # where it would stall every other client's stream and /health
        req = parse_request(body) if len(body) < (1 << 18) else await run_in_threadpool(parse_request, body)
        if req.model not in (None, "", settings.model_name):
            raise APIError(404, f"the model {req.model!r} does not exist (this server serves "
                                f"{settings.model_name!r})", param="model", code="model_not_found")
        stop = req.stop_list(settings.max_stop)
        if not engine.alive:
            raise APIError(503, "the generation engine is not running", type="server_error",
                           code="engine_unavailable")
        if engine.is_full():  # refuse early, before decoding any image
            raise busy_error(f"the server is busy ({engine.max_queue} requests waiting); retry later")
        with engine.preparing(t_arrival):
            job = await build_job(req, stop, t_arrival)
            try:
                engine.submit(job)
            except QueueFull as e:
                raise busy_error(str(e)) from None
            except EngineStopped as e:
                raise APIError(503, str(e), type="server_error", code="engine_unavailable") from None
        events = job.events

        cid, created_at, name = new_completion_id(), now(), settings.model_name
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                stream_events(job, events, cid, created_at, name, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await collect(request, job, events, cid, created_at, name)

    async def collect(request, job: Job, events: asyncio.Queue, cid: str, created_at: int, name: str):
        """Wait for the whole answer; a client that goes away cancels its request."""
        disconnect = asyncio.ensure_future(_wait_disconnect(request))
        text: list[str] = []
        try:
            while True:
                get = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({get, disconnect}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    job.cancel()
                    return Response(status_code=499)  # nobody reads it
                event = get.result()
                if event[0] == "delta":
                    text.append(event[1])
                elif event[0] == "done":
                    _, reason, usage, timings = event
                    return JSONResponse(completion_response(id=cid, model=name, created=created_at,
                                                            text="".join(text), finish_reason=reason,
                                                            usage=usage, timings=timings))
                else:
                    raise _engine_error(event[1])
        finally:
            disconnect.cancel()
            if not job.done:
                job.cancel()

    async def stream_events(job: Job, events: asyncio.Queue, cid: str, created_at: int, name: str,
                            include_usage: bool) -> AsyncIterator[bytes]:
        def sse(obj: Any) -> bytes:
            return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

        def make(**kw) -> dict:
            return chunk(id=cid, model=name, created=created_at, include_usage=include_usage, **kw)

        try:
            yield sse(make(delta={"role": "assistant", "content": ""}))
            while True:
                event = await events.get()
                if event[0] == "delta":
                    yield sse(make(delta={"content": event[1]}))
                elif event[0] == "done":
                    _, reason, usage, timings = event
                    # timings come with the last choice chunk in every stream (documented in `fastvlm serve
                    # --help`); usage, as OpenAI sends it, only in the usage-only chunk that
                    # stream_options.include_usage adds (null on every other chunk then, absent otherwise)
                    yield sse(make(delta={}, finish_reason=reason, timings=timings))
                    if include_usage:
                        yield sse(make(no_choices=True, usage=usage, timings=timings))
                    break
                else:
                    err = _engine_error(event[1])
                    yield sse(err.body())
                    break
            yield b"data: [DONE]\n\n"
        finally:
            # Runs when the stream ends and when the client disconnects (the task is cancelled).
            if not job.done:
                job.cancel()

    def _engine_error(exc: BaseException) -> APIError:
        if isinstance(exc, EngineStopped):
            return APIError(503, str(exc), type="server_error", code="engine_unavailable")
        if isinstance(exc, FastVLMError):
            return bad_request(str(exc))
        return APIError(500, f"generation failed: {type(exc).__name__}", type="server_error",
                        code="generation_failed")

    return app


def uvicorn_server(app, *, grace_s: float = 10.0, **config):
    """A uvicorn server for `app` (from `create_app`) that shuts down without cutting answers off.

    Told to stop (SIGTERM, Ctrl-C, `should_exit`), it stops listening (uvicorn closes the socket and idle
    connections) and drains: requests already running, queued or still arriving go on for up to `grace_s`
    seconds. Whatever is still unfinished then ends as the engine's own error (a JSON 503, or an error event and
    ``[DONE]`` in a stream), not uvicorn's plain-text 500 after its own timeout, which is set a little later so
    that those answers are written. A second Ctrl-C quits at once, as in uvicorn.
    """
    import uvicorn

    engine = app.state.engine

    class _DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None):
            loop = asyncio.get_running_loop()
            timer = loop.call_later(max(0.0, grace_s), lambda: loop.run_in_executor(None, engine.stop))
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    config.setdefault("timeout_graceful_shutdown", max(0.0, grace_s) + 5.0)
    return _DrainingServer(uvicorn.Config(app, **config))


async def _wait_disconnect(request) -> None:
    """Returns when the client has gone away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return

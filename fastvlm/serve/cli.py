"""Serve an OpenAI-compatible chat API (with images) and a small web page.

  fastvlm serve --model DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Endpoints:
  POST /v1/chat/completions   OpenAI chat completions; text and image_url parts; stream: true for SSE
  GET  /v1/models             the served model (its id is --served-model-name, default the directory name)
  GET  /health                200 {"status": "ok", ...} while the engine runs, else 503
  GET  /                      web page: pick or paste an image, ask, watch the answer stream
  GET  /docs, /openapi.json   the API's schema (FastAPI); not served when an API key is set

Images are image_url parts holding base64 data: URIs (data:image/png;base64,...). http(s)
URLs are fetched only with --allow-remote-images (bounded in bytes, time and redirects; the
server then fetches any address a client names, so enable it for trusted clients only).
Local file paths are never read.

Every non-streamed response carries `usage` (prompt_tokens counts image tokens) and a `timings` object
(ttft_s from request received to first token, queue_s, encode_s, prefill_s, decode_s,
decode_tokens_per_s, total_s, batch_size). A stream carries timings on its last choice chunk
and, as OpenAI's, usage only with stream_options.include_usage, in a usage-only chunk after it.

Parameters: max_tokens / max_completion_tokens, temperature (default 0 = greedy, unlike
OpenAI's 1; see --default-temperature), top_p, seed, stop (up to 4 strings), stream,
stream_options.include_usage; extensions: top_k, repetition_penalty, ignore_eos. Refused
with 400: n > 1, tools/functions, logprobs, logit_bias, presence/frequency penalties,
response_format other than text, audio output. System and developer messages may come
anywhere (each renders as a system turn in place); top_p 0 keeps only the top token.
Unknown fields are ignored. Bad input of any kind gets a 4xx with {"error": {"message",
"type", "param", "code"}}; a full queue gets 429.

Concurrency: one engine thread owns the model. Requests arriving within --batch-window-ms
of each other (up to --max-batch-size, same sampling settings) are encoded and decoded as
one batch; each stops at its own max_tokens. Greedy answers are those of the request alone up
to floating-point rounding (a padded batch sums in another order; where two tokens are
nearly tied, a later token can differ). A client that disconnects stops its generation.
At most --max-queue requests wait; more get 429.

Shutdown: SIGTERM or Ctrl-C stops listening; requests running, queued or still arriving get
--shutdown-grace seconds to finish, then end with a 503 error. A second Ctrl-C quits at once.

Security: with --api-key (or FASTVLM_API_KEY) every /v1 request needs
"Authorization: Bearer KEY". Without a key the server refuses to listen on a non-loopback
address unless --allow-unauthenticated-remote is given.

Examples:
  fastvlm serve --model apple-fastvlm-0.5b --port 8000

  IMG=$(base64 -w0 photo.jpg)
  curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{
    "model": "apple-fastvlm-0.5b", "max_tokens": 128,
    "messages": [{"role": "user", "content": [
      {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,'"$IMG"'"}},
      {"type": "text", "text": "Describe the image."}]}]}'

  curl -N http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "apple-fastvlm-0.5b", "stream": true, "messages": [{"role": "user", "content": "Hi"}]}'

  # Python, with the official openai client
  import base64, openai
  client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused-or-your-key")
  url = "data:image/jpeg;base64," + base64.b64encode(open("photo.jpg", "rb").read()).decode()
  r = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=128, messages=[
      {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                   {"type": "text", "text": "Describe the image."}]}])
  print(r.choices[0].message.content, r.usage, r.model_extra["timings"])
  for c in client.chat.completions.create(model=r.model, stream=True, messages=[...]):
      print(c.choices[0].delta.content or "" if c.choices else "", end="", flush=True)
"""

from __future__ import annotations

import ipaddress
import os
import sys

from ..commands.common import add_model_args, int_arg, parse_size, seconds_arg

LOOPBACK_NAMES = {"localhost", "ip6-localhost", "ip6-loopback"}


def is_loopback(host: str) -> bool:
    h = host.strip().strip("[]").lower()
    if h in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def listening_socket(host: str, port: int):
    """A socket bound to host:port, made before the model loads: a port in use or an address this machine does
    not have fails at once, in one line, and the server then listens on exactly this socket."""
    import socket

    # as uvicorn binds when it makes the socket itself: IPv6 for an address with a colon, else IPv4
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise _config_error(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _origin(text: str) -> str:
    """An origin as browsers send it (scheme://host[:port], no path or trailing slash), or *."""
    import argparse
    import re

    if text == "*" or re.fullmatch(r"https?://[^/\s:]+(:\d{1,5})?", text):
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is not an origin: give scheme://host[:port] as the browser sends it, e.g. http://localhost:3000 "
        f"(no path, no trailing slash), or *")


def add_arguments(p):
    add_model_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int_arg(1, 65535), default=8000, help="port, 1-65535 (default 8000)")
    g.add_argument("--served-model-name", default=None,
                   help="model id in the API (default: the model directory's name)")
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 requests (default: env FASTVLM_API_KEY)")
    g.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN", type=_origin,
                   help="let browser pages on ORIGIN (e.g. http://localhost:3000, or * for any) call the API "
                        "(CORS; repeatable; default none: only the server's own page)")
    g.add_argument("--allow-unauthenticated-remote", action="store_true",
                   help="allow listening on a non-loopback address without an API key")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    g.add_argument("--no-access-log", action="store_true", help="do not log every request")
    g.add_argument("--no-warmup", action="store_true", help="skip the warm-up generation before listening")
    g.add_argument("--shutdown-grace", type=seconds_arg, default=10.0, metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C, stop listening and give the requests already running or queued "
                        "this long to finish; those still unfinished then end with a 503 error (an error event "
                        "in a stream). A second Ctrl-C quits at once (default 10)")

    b = p.add_argument_group("batching")
    b.add_argument("--max-batch-size", type=int, default=8, help="most requests decoded together (default 8)")
    b.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="how long the engine waits for more requests to batch with the first (default 10)")
    b.add_argument("--max-queue", type=int, default=64,
                   help="most requests waiting for the engine; more get 429 (default 64)")

    lim = p.add_argument_group("limits")
    lim.add_argument("--max-request-bytes", default="32MiB", help="largest request body (default 32MiB)")
    lim.add_argument("--max-image-bytes", default="16MiB", help="largest encoded image (default 16MiB)")
    lim.add_argument("--max-image-pixels", type=int, default=50_000_000,
                     help="largest image in pixels, checked before decoding; the canvas the preprocessing "
                          "makes of it (a long strip padded to a square) may be 4 times this (default 50000000)")
    lim.add_argument("--max-images", type=int, default=4, help="most images per request (default 4)")
    lim.add_argument("--max-prompt-tokens", type=int, default=None,
                     help="longest prompt in tokens, image tokens included (default: the model's context)")
    lim.add_argument("--max-tokens-limit", type=int, default=4096,
                     help="largest max_tokens a request may ask for (default 4096)")
    lim.add_argument("--default-max-tokens", type=int, default=512,
                     help="max_tokens when a request gives none (default 512)")
    lim.add_argument("--default-temperature", type=float, default=0.0,
                     help="temperature when a request gives none (default 0: greedy)")
    lim.add_argument("--allow-remote-images", action="store_true",
                     help="fetch http(s) image URLs (off by default; the server fetches any address a client names)")
    lim.add_argument("--remote-image-timeout", type=seconds_arg, default=10.0,
                     help="seconds allowed for fetching one remote image (default 10)")
    lim.add_argument("--body-timeout", type=seconds_arg, default=60.0, metavar="SECONDS",
                     help="longest pause, in seconds, between the pieces of a request body before it is "
                          "refused with 408 (a stalled upload; a slow but moving one is not cut); 0: no limit "
                          "(default 60)")


def settings_from_args(args, model_name: str):
    from .app import ServeSettings

    for name in ("max_batch_size", "max_queue", "max_images", "max_tokens_limit", "default_max_tokens"):
        if getattr(args, name) < 1:
            raise _config_error(f"--{name.replace('_', '-')} must be at least 1")
    return ServeSettings(
        model_name=model_name,
        api_key=args.api_key or os.environ.get("FASTVLM_API_KEY") or None,
        max_request_bytes=parse_size(args.max_request_bytes),
        max_image_bytes=parse_size(args.max_image_bytes),
        max_image_pixels=args.max_image_pixels,
        max_images_per_request=args.max_images,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=args.default_max_tokens,
        default_temperature=args.default_temperature,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        batch_window_ms=args.batch_window_ms,
        allow_remote_images=args.allow_remote_images,
        remote_image_timeout_s=args.remote_image_timeout,
        body_timeout_s=args.body_timeout,
        allowed_origins=tuple(args.allow_origin),
    )


def _config_error(msg: str):
    from ..errors import ConfigError

    return ConfigError(msg)


def warmup(model, max_batch_size: int = 1) -> None:
    """Pay first-call set-up costs before the first request does.

    One short generation with an image and, on a GPU, the encoder at every batch size up to
    `max_batch_size` (each new size costs a second or two on its first call with CUDA). Run it
    in the thread that will serve (the engine's `start(warmup=...)` does).
    """
    import torch
    from PIL import Image

    from ..generation import generate_steps

    proc = model.processor
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    prompt = proc.apply_chat_template(messages)
    inputs = proc(images=[Image.new("RGB", (64, 64), (127, 127, 127))] * 2, text=[prompt] * 2)
    with torch.inference_mode():
        for _ in generate_steps(model, inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values"),
                                max_new_tokens=2):
            pass
        if model.device.type == "cuda":
            size = model.config.image_size
            for n in range(1, max_batch_size + 1):
                model.get_image_features(torch.zeros(n, 3, size, size))
            torch.cuda.synchronize(model.device)


def run(args) -> int:
    from ..commands.common import load_model, model_path

    api_key = args.api_key or os.environ.get("FASTVLM_API_KEY")
    if not is_loopback(args.host) and not api_key and not args.allow_unauthenticated_remote:
        raise _config_error(
            f"refusing to listen on {args.host} without an API key: anyone who can reach it could use the "
            "model. Give --api-key (or FASTVLM_API_KEY), or --allow-unauthenticated-remote if that is intended")
    name = args.served_model_name or os.path.basename(os.path.normpath(model_path(args))) or "fastvlm"
    settings = settings_from_args(args, name)

    import uvicorn  # noqa: F401  (missing, the CLI names the extra that installs it, before the model loads)

    if args.allow_remote_images:
        import httpx  # noqa: F401  (fetches remote images; missing, the CLI names the extra that installs it)
    from .app import create_app, uvicorn_server

    sock = listening_socket(args.host, args.port)
    try:
        model = load_model(args)
        app = create_app(model, settings,
                         warmup=None if args.no_warmup else (lambda: warmup(model, settings.max_batch_size)))
        auth = "API key required" if settings.api_key else "no API key"
        print(f"serving {name!r} on http://{args.host}:{args.port} ({auth}; batch <= {settings.max_batch_size}, "
              f"queue <= {settings.max_queue})", file=sys.stderr)
        server = uvicorn_server(app, grace_s=args.shutdown_grace, host=args.host, port=args.port,
                                log_level=args.log_level, access_log=not args.no_access_log)
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            pass  # Ctrl-C after a graceful shutdown (uvicorn re-raises the signal it caught): a normal exit
    finally:
        sock.close()
    return 0

"""Helpers for running the server in-process: tests, the browser test and the load test.

  python -m fastvlm.serve.testing --preset fastvlm-tiny --port 8000

serves a random-weight preset with a small tokenizer trained on the fly (no files, no
download): its answers are noise, its timings and behaviour are real.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import threading
import time
from typing import Iterator, Optional


def tiny_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer small enough for the tiny preset (text vocabulary 512)."""
    from .. import tokenization

    corpus = getattr(tokenization, "_STANDIN_CORPUS", None) or _CORPUS
    return tokenization.train_bpe_tokenizer(corpus.splitlines(keepends=True), vocab_size=vocab_size)


_CORPUS = """\
The image shows a red bus parked on a city street next to a tall building with many windows.
A small white dog is sitting on a green lawn in front of a wooden house. The sky is blue and clear.
What is shown in this photo? How many people are there? Describe the image in detail.
You are a helpful assistant. Answer the question using a single word or phrase.
0 1 2 3 4 5 6 7 8 9 ! ? . , ; : ' " - ( ) [ ] { } < > / | @ # $ % ^ & * + = ~ _
"""


def preset_model(preset: str = "fastvlm-tiny", *, device: str = "cpu", dtype=None, seed: int = 0):
    """A random-weight model of `preset` with a tokenizer that fits its vocabulary."""
    import torch

    from ..config import get_preset
    from ..model import FastVLM

    vocab = int(get_preset(preset).text["vocab_size"])
    if vocab <= 1024:
        tok = tiny_tokenizer(min(400, vocab - 8))
    else:
        from ..tokenization import standin_qwen2_tokenizer

        tok = standin_qwen2_tokenizer()
    return FastVLM.from_preset(preset, tokenizer=tok, device=device,
                               dtype=dtype if dtype is not None else torch.float32, seed=seed)


def free_socket(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.set_inheritable(True)
    return sock


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, app, host: str = "127.0.0.1", log_level: str = "warning", grace_s: float = 2.0):
        from .app import uvicorn_server

        self.app = app
        self.sock = free_socket(host)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn_server(app, grace_s=grace_s, log_level=log_level, access_log=False)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name=f"uvicorn-{self.port}", daemon=True)

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    @property
    def engine(self):
        return self.app.state.engine


@contextlib.contextmanager
def serve_in_thread(model, settings=None, grace_s: float = 2.0, **setting_overrides) -> Iterator[ServerThread]:
    from .app import ServeSettings, create_app

    settings = settings or ServeSettings(**setting_overrides)
    server = ServerThread(create_app(model, settings), grace_s=grace_s).start()
    try:
        yield server
    finally:
        server.stop()


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastvlm.serve.testing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="fastvlm-tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--batch-window-ms", type=float, default=10.0)
    args = p.parse_args(argv)

    from ..model import resolve_device, resolve_dtype
    from .app import ServeSettings, create_app, uvicorn_server
    from .cli import warmup

    device = resolve_device(args.device)
    model = preset_model(args.preset, device=str(device), dtype=resolve_dtype(args.dtype, device))
    # as `fastvlm serve` sets a loaded model up (fastvlm.commands.common.load_model)
    model.set_attention_implementation("sdpa")
    if device.type != "mps":
        model.use_channels_last(True)
    settings = ServeSettings(model_name=args.served_model_name or args.preset, max_batch_size=args.max_batch_size,
                             max_queue=args.max_queue, batch_window_ms=args.batch_window_ms)
    print(f"serving random-weight {args.preset} on http://127.0.0.1:{args.port}", file=sys.stderr)
    app = create_app(model, settings, warmup=lambda: warmup(model, settings.max_batch_size))
    uvicorn_server(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

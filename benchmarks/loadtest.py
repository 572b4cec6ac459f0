#!/usr/bin/env python
"""Load test for `fastvlm serve`: requests/s, TTFT and latency at several concurrency levels.

Starts a server (or targets one on this machine with --url), sends streamed chat requests
with an image from N concurrent clients for each N in --concurrency, and writes
benchmarks/results/loadtest-<model>.json with the machine, device, dtype and model noted.

  python benchmarks/loadtest.py                                  # random-weight fastvlm-tiny on the CPU
  python benchmarks/loadtest.py --preset fastvlm-0.5b --device cuda --dtype bf16
  python benchmarks/loadtest.py --model DIR --device cuda        # a checkpoint, served by `fastvlm serve`
  python benchmarks/loadtest.py --url http://127.0.0.1:8000      # a server that is already running

Every level is bounded by --requests (per level) and --max-seconds. Only 127.0.0.1 is ever
contacted. Each request asks for --max-tokens tokens with ignore_eos, so every answer has
the same length and levels are comparable. TTFT is measured twice: by the client (request
sent -> first content chunk) and by the server (`timings.ttft_s`: request received -> first
token chosen).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from typing import Optional
from urllib.parse import urlparse

HERE = os.path.dirname(os.path.abspath(__file__))


def percentile(values: list[float], q: float) -> Optional[float]:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def test_image(size: tuple[int, int], seed: int) -> str:
    """A PNG data URI with some structure (shapes on a gradient), different per seed."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    d = ImageDraw.Draw(img)
    for k in range(6):
        x, y = (seed * 37 + k * 53) % (w - 40), (seed * 91 + k * 29) % (h - 40)
        d.rectangle((x, y, x + 40, y + 40), fill=((seed * 50 + k * 40) % 256, 120, 200 - k * 20))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    if args.model:
        cmd = [sys.executable, "-m", "fastvlm.cli", "serve", "--model", args.model, "--port", str(port),
               "--device", args.device, "--dtype", args.dtype, "--no-access-log", "--log-level", "warning",
               "--max-queue", "1024"]
    else:
        cmd = [sys.executable, "-m", "fastvlm.serve.testing", "--preset", args.preset, "--port", str(port),
               "--device", args.device, "--dtype", args.dtype, "--max-queue", "1024"]
    cmd += ["--max-batch-size", str(args.max_batch_size), "--batch-window-ms", str(args.batch_window_ms)]
    print("starting:", " ".join(cmd), file=sys.stderr)
    proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_healthy(client, url: str, proc: Optional[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            r = await client.get(url + "/health")
            if r.status_code == 200:
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        await asyncio.sleep(0.5)
    raise SystemExit(f"the server at {url} did not become healthy in {timeout:.0f} s")


async def one_request(client, url: str, headers: dict, body: dict) -> dict:
    t0 = time.perf_counter()
    first = None
    timings = usage = None
    n_chunks = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            await r.aread()
            return {"ok": False, "status": r.status_code, "error": r.text[:200]}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            if "error" in msg:
                return {"ok": False, "status": 200, "error": msg["error"].get("message")}
            if msg.get("choices") and msg["choices"][0]["delta"].get("content"):
                n_chunks += 1
                if first is None:
                    first = time.perf_counter()
            timings = msg.get("timings") or timings
            usage = msg.get("usage") or usage
    end = time.perf_counter()
    return {"ok": True, "latency_s": end - t0, "client_ttft_s": (first - t0) if first else None,
            "server_ttft_s": timings.get("ttft_s") if timings else None,
            "batch_size": timings.get("batch_size") if timings else None,
            "completion_tokens": usage.get("completion_tokens") if usage else None,
            "prompt_tokens": usage.get("prompt_tokens") if usage else None, "chunks": n_chunks}


async def run_level(client, url: str, headers: dict, model: str, concurrency: int, n_requests: int,
                    max_seconds: float, max_tokens: int, images: list[str]) -> dict:
    counter = iter(range(n_requests))
    results: list[dict] = []
    t_start = time.perf_counter()
    deadline = t_start + max_seconds

    async def worker(w: int) -> None:
        for i in counter:
            if time.perf_counter() > deadline:
                return
            body = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                    "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
                    "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": images[i % len(images)]}},
                        {"type": "text", "text": f"Describe image {i} in detail."}]}]}
            try:
                results.append(await one_request(client, url, headers, body))
            except Exception as e:  # noqa: BLE001 - counted as an error
                results.append({"ok": False, "status": None, "error": f"{type(e).__name__}: {e}"})

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    wall = time.perf_counter() - t_start
    ok = [r for r in results if r["ok"]]

    def stats(key: str) -> dict:
        vals = [r[key] for r in ok if r.get(key) is not None]
        return {"p50": percentile(vals, 50), "p90": percentile(vals, 90), "p99": percentile(vals, 99),
                "mean": sum(vals) / len(vals) if vals else None}

    tokens = sum(r.get("completion_tokens") or 0 for r in ok)
    batch_sizes = [r["batch_size"] for r in ok if r.get("batch_size")]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "error_samples": [r.get("error") for r in results if not r["ok"]][:3],
        "wall_s": wall,
        "requests_per_s": len(ok) / wall if wall > 0 else None,
        "output_tokens_per_s": tokens / wall if wall > 0 else None,
        "ttft_client_s": stats("client_ttft_s"),
        "ttft_server_s": stats("server_ttft_s"),
        "latency_s": stats("latency_s"),
        "mean_batch_size": sum(batch_sizes) / len(batch_sizes) if batch_sizes else None,
        "prompt_tokens": ok[0].get("prompt_tokens") if ok else None,
    }


def fmt_ms(x: Optional[float]) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


async def main_async(args) -> int:
    import httpx

    proc = None
    url = args.url
    if url:
        host = urlparse(url).hostname or ""
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit(f"refusing to load-test {host}: this program only talks to 127.0.0.1")
        url = url.rstrip("/")
    else:
        proc, url = start_server(args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    n_conn = max(args.concurrency) + 4
    limits = httpx.Limits(max_connections=n_conn, max_keepalive_connections=n_conn)
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(args.max_seconds + 120), limits=limits,
                                     trust_env=False) as client:
            await wait_healthy(client, url, proc, args.startup_timeout)
            meta = (await client.get(url + "/v1/models", headers=headers)).json()["data"][0]
            model = meta["id"]
            images = [test_image(tuple(args.image_size), seed) for seed in range(8)]
            # warm-up, not measured
            await run_level(client, url, headers, model, 2, 4, 60, args.max_tokens, images)
            levels = []
            print(f"{'conc':>4} {'ok':>5} {'err':>4} {'req/s':>7} {'tok/s':>8} {'TTFT p50':>9} {'p99':>7} "
                  f"{'srvTTFT p50':>11} {'lat p50':>8} {'p99':>7} {'batch':>6}   (ms)")
            for c in args.concurrency:
                n = max(args.requests, 2 * c)
                res = await run_level(client, url, headers, model, c, n, args.max_seconds, args.max_tokens, images)
                levels.append(res)
                print(f"{c:>4} {res['ok']:>5} {res['errors']:>4} {res['requests_per_s'] or 0:>7.2f} "
                      f"{res['output_tokens_per_s'] or 0:>8.1f} {fmt_ms(res['ttft_client_s']['p50']):>9} "
                      f"{fmt_ms(res['ttft_client_s']['p99']):>7} {fmt_ms(res['ttft_server_s']['p50']):>11} "
                      f"{fmt_ms(res['latency_s']['p50']):>8} {fmt_ms(res['latency_s']['p99']):>7} "
                      f"{res['mean_batch_size'] or 0:>6.2f}", flush=True)
    finally:
        if proc is not None:
            stop_server(proc)

    name = args.name or model
    out = args.out or os.path.join(HERE, "results", f"loadtest-{name}.json")
    report = {
        "model": model,
        "model_source": args.model or (f"preset {args.preset} (random weights)" if not args.url else args.url),
        "device": meta.get("device", args.device),
        "dtype": meta.get("dtype", args.dtype),
        "image_size": meta.get("image_size"),
        "image_tokens": meta.get("image_tokens"),
        "machine": machine_info(),
        "settings": {"max_tokens": args.max_tokens, "ignore_eos": True, "stream": True, "temperature": 0,
                     "image_px": list(args.image_size), "requests_per_level": args.requests,
                     "max_seconds_per_level": args.max_seconds,
                     "server_max_batch_size": None if args.url else args.max_batch_size,
                     "server_batch_window_ms": None if args.url else args.batch_window_ms},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "levels": levels,
        "notes": args.notes,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0 if all(lv["errors"] == 0 for lv in levels) else 1


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--url", help="target a running server (127.0.0.1 only) instead of starting one")
    src.add_argument("--model", help="checkpoint directory to serve with `fastvlm serve`")
    p.add_argument("--preset", default="fastvlm-tiny", help="random-weight preset to serve (default fastvlm-tiny)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--api-key", default=os.environ.get("FASTVLM_API_KEY"))
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16],
                   help="comma-separated client counts (default 1,2,4,8,16)")
    p.add_argument("--requests", type=int, default=32, help="requests per level (at least 2x the concurrency)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="time bound per level")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per answer (ignore_eos: exactly this many)")
    p.add_argument("--image-size", type=int, nargs=2, default=[640, 480], metavar=("W", "H"))
    p.add_argument("--max-batch-size", type=int, default=8, help="server setting when this program starts it")
    p.add_argument("--batch-window-ms", type=float, default=10.0, help="server setting when this program starts it")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--name", default=None, help="model name in the output file name (default: the served id)")
    p.add_argument("--out", default=None, help="output JSON (default benchmarks/results/loadtest-<model>.json)")
    p.add_argument("--notes", default=None, help="free text stored with the results")
    args = p.parse_args(argv)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())

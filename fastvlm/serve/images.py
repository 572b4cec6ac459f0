"""Turning an ``image_url`` into image bytes: base64 ``data:`` URIs, and http(s) URLs when allowed.

Local file paths and ``file:`` URLs are never read: a client must not be able to make
the server open files on its own disk. Remote fetching is off by default; an operator
turns it on with ``--allow-remote-images``, and every fetch is bounded in bytes, time
and redirects. Note that with remote fetching on, the server fetches whatever address a
client names, including ones only the server can reach (its own network): enable it
only for clients you trust, or behind a proxy that restricts egress.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from dataclasses import dataclass
from typing import Optional

from .protocol import APIError, bad_request

_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)


@dataclass
class ImageLimits:
    max_bytes: int
    allow_remote: bool = False
    remote_timeout_s: float = 10.0
    max_redirects: int = 3


def _too_large(n: int, limit: int, param: str) -> APIError:
    # 400, as for an image over the pixel limit: the request body was within its own limit (413 is for that)
    return APIError(400, f"image is {n} bytes, more than the limit of {limit} bytes (the server's --max-image-bytes)",
                    param=param, code="image_too_large")


def decode_data_uri(url: str, limits: ImageLimits, param: str) -> bytes:
    m = _DATA_URI.match(url)
    if not m:
        raise bad_request("malformed data: URI (expected data:image/<type>;base64,<data>)", param=param,
                          code="invalid_image")
    if not m.group("b64"):
        raise bad_request("data: URIs must be base64-encoded (data:image/<type>;base64,<data>)", param=param,
                          code="invalid_image")
    payload = url[m.end():]
    # base64 grows data by 4/3: refuse an oversized payload before decoding it.
    approx = len(payload) * 3 // 4
    if approx > limits.max_bytes + 3:
        raise _too_large(approx, limits.max_bytes, param)
    payload = re.sub(r"\s+", "", payload)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"invalid base64 image data: {e}", param=param, code="invalid_image") from None
    if not data:
        raise bad_request("image data is empty", param=param, code="invalid_image")
    if len(data) > limits.max_bytes:
        raise _too_large(len(data), limits.max_bytes, param)
    return data


async def fetch_remote(url: str, limits: ImageLimits, param: str, client=None) -> bytes:
    """GET an http(s) image with a total deadline, a byte cap (streamed) and a bounded number of redirects."""
    import httpx

    async def _get(c: "httpx.AsyncClient") -> bytes:
        async with c.stream("GET", url, headers={"Accept": "image/*"}) as r:
            if r.status_code != 200:
                raise bad_request(f"fetching the image failed: HTTP {r.status_code}", param=param,
                                  code="image_fetch_failed")
            declared = r.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > limits.max_bytes:
                raise _too_large(int(declared), limits.max_bytes, param)
            buf = bytearray()
            async for piece in r.aiter_bytes():
                buf += piece
                if len(buf) > limits.max_bytes:
                    raise _too_large(len(buf), limits.max_bytes, param)
            return bytes(buf)

    async def _fetch() -> bytes:
        if client is not None:
            return await _get(client)
        async with httpx.AsyncClient(follow_redirects=True, max_redirects=limits.max_redirects,
                                     timeout=limits.remote_timeout_s, trust_env=False) as c:
            return await _get(c)

    try:
        # wait_for, not asyncio.timeout: the package supports Python 3.10, which lacks the latter
        return await asyncio.wait_for(_fetch(), limits.remote_timeout_s)
    except (TimeoutError, asyncio.TimeoutError):  # distinct classes before Python 3.11
        raise bad_request(f"fetching the image took longer than {limits.remote_timeout_s:g} s", param=param,
                          code="image_fetch_failed") from None
    except httpx.TooManyRedirects:
        raise bad_request(f"fetching the image followed more than {limits.max_redirects} redirects",
                          param=param, code="image_fetch_failed") from None
    except httpx.HTTPError as e:
        raise bad_request(f"fetching the image failed: {type(e).__name__}: {e}", param=param,
                          code="image_fetch_failed") from None


async def image_bytes(url: str, limits: ImageLimits, param: str) -> bytes:
    """The encoded bytes of one image_url (not yet decoded as an image)."""
    if not isinstance(url, str) or not url:
        raise bad_request("image_url.url must be a non-empty string", param=param)
    scheme = url.split(":", 1)[0].lower() if ":" in url[:16] else ""
    if scheme == "data":
        return decode_data_uri(url, limits, param)
    if scheme in ("http", "https"):
        if not limits.allow_remote:
            raise bad_request("remote image URLs are disabled on this server; send the image as a base64 "
                              "data: URI (the operator can enable fetching with --allow-remote-images)",
                              param=param, code="remote_images_disabled")
        return await fetch_remote(url, limits, param)
    shown = url if len(url) <= 60 else url[:57] + "..."
    raise bad_request(f"unsupported image_url {shown!r}: use a base64 data: URI"
                      + (" or an http(s) URL" if limits.allow_remote else "")
                      + "; local file paths are never read", param=param, code="invalid_image")


def describe_param(message_index: int, part_index: Optional[int]) -> str:
    return f"messages[{message_index}].content[{part_index}].image_url"

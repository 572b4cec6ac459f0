"""The web page in headless Debian chromium (driven by Playwright): upload an image, see the answer stream.

Needs `pip install playwright` and the system chromium (`apt-get install chromium`); Playwright's
own browser download is not used. Skipped when either is missing.
"""

from __future__ import annotations

import os
import shutil

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("FASTVLM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM}")
    with sync_api.sync_playwright() as pw:
        try:
            b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        except Exception as e:  # noqa: BLE001 - a browser that cannot start is an environment problem
            pytest.skip(f"chromium does not start: {e}")
        yield b
        b.close()


@pytest.fixture(scope="module")
def server():
    pytest.importorskip("fastapi")
    from fastvlm.serve.testing import preset_model, serve_in_thread

    with serve_in_thread(preset_model("fastvlm-tiny"), model_name="fastvlm-tiny-test", default_max_tokens=24) as s:
        yield s


def _png(path) -> str:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (320, 200), (240, 240, 235))
    d = ImageDraw.Draw(img)
    d.rectangle((20, 30, 140, 170), fill=(210, 40, 40))
    d.ellipse((170, 40, 290, 160), fill=(40, 90, 210))
    img.save(path)
    return str(path)


def test_page_uploads_an_image_and_streams_the_answer(browser, server, tmp_path):
    page = browser.new_page(viewport={"width": 900, "height": 820})
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('fastvlm-tiny-test')")

    page.set_input_files("#file", _png(tmp_path / "shapes.png"))
    page.wait_for_selector("#preview:not([hidden])")
    page.fill("#question", "What shapes are in the picture?")
    page.click("details summary")  # settings
    page.fill("#max-tokens", "24")
    page.click("#send")
    page.wait_for_function("document.getElementById('stats').textContent.includes('tokens')", timeout=60_000)
    page.wait_for_function("!document.getElementById('send').disabled", timeout=60_000)

    answer = page.inner_text("#answer")
    stats = page.inner_text("#stats")
    assert answer.strip(), "no answer text"
    assert "TTFT" in stats and "tokens" in stats, stats
    assert page.inner_text("#error") == ""
    # the page loads nothing from outside the server
    assert all(u.startswith(server.url) or u.startswith("data:") for u in requests), requests

    # the answer is the one the API gives for the same request (greedy)
    import base64

    import httpx

    data = (tmp_path / "shapes.png").read_bytes()
    body = {"model": "fastvlm-tiny-test", "max_tokens": 24, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}},
        {"type": "text", "text": "What shapes are in the picture?"}]}]}
    api = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    expected = api["choices"][0]["message"]["content"] or "(empty answer)"
    assert answer == expected

    out = os.environ.get("FASTVLM_SCREENSHOT_DIR")
    page.screenshot(path=os.path.join(out, "serve-page.png") if out else str(tmp_path / "serve-page.png"),
                    full_page=True)
    page.close()


def test_page_shows_api_errors(browser, server):
    page = browser.new_page()
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('fastvlm-tiny-test')")
    page.fill("#question", "Hello")
    page.click("details summary")
    page.fill("#max-tokens", "999999")  # over the server's limit: a 400 with a message
    page.click("#send")
    page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=30_000)
    assert "max_tokens" in page.inner_text("#error")
    page.close()

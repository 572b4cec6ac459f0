"""The web page in headless Debian chromium (driven by Playwright): upload an image, see the answer stream.

Needs `pip install playwright` and the system chromium (`apt-get install chromium`); Playwright's
own browser download is not used. Skipped when either is missing.
"""

from __future__ import annotations

import os
import shutil
import time

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


def _expect():
    from playwright.sync_api import expect

    return expect


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
    expect = _expect()
    expect(page.locator("#model")).to_contain_text("fastvlm-tiny-test")

    page.set_input_files("#file", _png(tmp_path / "shapes.png"))
    page.wait_for_selector("#preview:not([hidden])")
    page.fill("#question", "What shapes are in the picture?")
    page.click("details summary")  # settings
    page.fill("#max-tokens", "24")
    page.click("#send")
    # locator waits run outside the page's scripts, so they work under its Content-Security-Policy (no eval)
    expect(page.locator("#stats")).to_contain_text("tokens", timeout=60_000)
    expect(page.locator("#send")).to_be_enabled(timeout=60_000)

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
    expect = _expect()
    expect(page.locator("#model")).to_contain_text("fastvlm-tiny-test")
    page.fill("#question", "Hello")
    page.click("details summary")
    page.fill("#max-tokens", "999999")  # over the server's limit: a 400 with a message
    page.click("#send")
    expect(page.locator("#error")).to_contain_text("max_tokens", timeout=30_000)
    page.close()


def _ready_page(browser, server):
    page = browser.new_page()
    posts = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    page.goto(server.url + "/")
    _expect()(page.locator("#model")).to_contain_text("fastvlm-tiny-test")
    return page, posts


def test_page_sends_one_request_at_a_time_and_stop_cancels_it(browser, server):
    page, posts = _ready_page(browser, server)
    expect = _expect()
    engine = server.engine
    engine.pause()  # the request waits in the queue until resumed
    try:
        page.fill("#question", "Hello")
        page.click("#send")
        expect(page.locator("#stop")).to_be_enabled()
        deadline = time.monotonic() + 30
        while engine.queued() != 1 and time.monotonic() < deadline:  # the POST reached the engine
            time.sleep(0.05)
        assert engine.queued() == 1
        # Ctrl+Enter in the question box and a double click must not start a second request
        page.focus("#question")
        page.keyboard.press("Control+Enter")
        page.dblclick("#send", force=True)
        page.wait_for_timeout(300)
        assert len(posts) == 1 and engine.queued() == 1, posts
        page.click("#stop")
        expect(page.locator("#send")).to_be_enabled()
        expect(page.locator("#stop")).to_be_disabled()
        # the server dropped it from the queue, and focus went back to the question
        deadline = time.monotonic() + 10
        while engine.queued() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.queued() == 0
        expect(page.locator("#question")).to_be_focused()
        assert page.inner_text("#error") == ""
    finally:
        engine.resume()
    page.close()


def test_page_opens_settings_for_an_invalid_value(browser, server):
    page, posts = _ready_page(browser, server)
    page.click("details summary")
    page.fill("#max-tokens", "0")
    page.click("details summary")  # closed again: the invalid field is hidden
    assert page.get_attribute("#settings", "open") is None
    page.click("#send")
    _expect()(page.locator("#settings")).to_have_attribute("open", "")
    assert posts == []
    page.close()


def test_page_refuses_undecodable_images_and_clears_the_error_for_a_good_one(browser, server, tmp_path):
    page, posts = _ready_page(browser, server)
    expect = _expect()
    fake = tmp_path / "fake.png"
    fake.write_text("not an image at all")
    page.set_input_files("#file", str(fake))
    expect(page.locator("#error")).to_contain_text("not an image the browser can read")
    assert page.get_attribute("#preview", "hidden") is not None
    page.set_input_files("#file", _png(tmp_path / "good.png"))
    expect(page.locator("#preview")).to_be_visible()
    expect(page.locator("#error")).to_be_empty()
    # a refused file replaces the good one: nothing is left chosen that Ask could send
    page.set_input_files("#file", str(fake))
    expect(page.locator("#error")).to_contain_text("not an image the browser can read")
    expect(page.locator("#preview")).to_be_hidden()
    page.close()


@pytest.mark.parametrize("body, answer, error", [
    # CRLF line ends, and one event's data split over two data: lines (joined with a newline, as the SSE spec says)
    ('data: {"choices":[{"delta":{"content":"Hello"}}]}\r\n\r\n'
     'data: {"choices":[{"delta":{"content":" there"},\r\ndata: "finish_reason":"stop"}]}\r\n\r\ndata: [DONE]\r\n\r\n',
     "Hello there", ""),
    # an error given as a bare string
    ('data: {"choices":[{"delta":{"content":"Hi"}}]}\n\ndata: {"error":"the backend fell over"}\n\n',
     "Hi", "the backend fell over"),
    # a stream cut off with no finish_reason and no [DONE]
    ('data: {"choices":[{"delta":{"content":"cut off mid sen"}}]}\n\n', "cut off mid sen", "incomplete"),
])
def test_page_reads_event_streams_as_the_spec_frames_them(browser, server, body, answer, error):
    page, _ = _ready_page(browser, server)
    expect = _expect()
    page.route("**/v1/chat/completions",
               lambda route: route.fulfill(status=200, body=body, headers={"Content-Type": "text/event-stream"}))
    page.fill("#question", "Hello")
    page.click("#send")
    expect(page.locator("#send")).to_be_enabled()
    assert page.inner_text("#answer") == answer
    if error:
        expect(page.locator("#error")).to_contain_text(error)
    else:
        assert page.inner_text("#error") == ""
    page.close()

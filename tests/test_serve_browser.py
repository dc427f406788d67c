"""The chat page in a real headless browser: Debian's chromium driven by Playwright.

Loads ``/`` from a real server (SmolLM2-135M-Instruct), sends a message, watches the answer
stream in (text present while the message is still marked as streaming, and growing), copies it,
stops a second answer half-way (the server frees the slot), and saves a screenshot
(``EVOLM_SCREENSHOT_DIR`` or pytest's tmp dir).

Setup on a fresh Debian machine: ``apt-get install -y chromium`` and ``pip install playwright``.
Never ``playwright install``: the system chromium is used through ``executable_path``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("EVOLM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the browser test needs playwright: pip install playwright")
if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
    pytest.skip(f"missing asset chromium (optional; install: make browser): none at {CHROMIUM} (or set EVOLM_CHROMIUM)",
                allow_module_level=True)

from test_serve import ServerProcess, smollm2_path  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(smollm2_path(), tmp_path_factory.mktemp("serve-browser") / "server.log", max_batch=4)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def test_chat_page_streams_copies_and_stops(server, browser, tmp_path):
    context = browser.new_context(viewport={"width": 1100, "height": 720})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    sync_api.expect(page.locator("#model")).to_contain_text("SmolLM2-135M-Instruct", timeout=30_000)
    sync_api.expect(page.locator("#status")).to_have_text("ready")

    # parameters: greedy, a short answer, a system prompt
    page.fill("#system", "You are a helpful assistant. Answer briefly.")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "48")
    page.fill("#prompt", "Write a short poem about the sea.")
    page.click("#send")

    answer = page.locator(".msg.assistant").last
    text = answer.locator(".text")
    sync_api.expect(page.locator(".msg.user")).to_have_text("Write a short poem about the sea.")
    # streamed: text is on screen while the message is still streaming, and it keeps growing
    page.wait_for_function("""() => { const m = [...document.querySelectorAll('.msg.assistant')].pop();
                                      return m && m.dataset.state === 'streaming'
                                             && m.querySelector('.text').textContent.length > 0; }""",
                           timeout=60_000)
    early = text.text_content()
    assert page.locator("#stop").is_enabled() and page.locator("#send").is_disabled()
    sync_api.expect(answer).to_have_attribute("data-state", "done", timeout=120_000)
    final = text.text_content()
    assert len(final) > len(early) > 0 and final.startswith(early)
    sync_api.expect(answer.locator(".info")).to_contain_text("tokens")
    assert not page.locator(".msg.error").count()

    # copy
    answer.locator(".copy").click()
    sync_api.expect(answer.locator(".copy")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == final

    shots = Path(os.environ.get("EVOLM_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / "chat.png"), full_page=True)

    # stop: a long answer, stopped once it has started
    page.fill("#max-tokens", "1000")
    page.fill("#prompt", "Now write a long story about a lighthouse keeper.")
    page.press("#prompt", "Enter")  # Enter sends, as the placeholder says
    second = page.locator(".msg.assistant").nth(1)
    sync_api.expect(second.locator(".text")).not_to_have_text("", timeout=60_000)
    page.click("#stop")
    sync_api.expect(second).to_have_attribute("data-state", "done", timeout=10_000)
    sync_api.expect(second.locator(".info")).to_contain_text("stopped")
    assert page.locator("#send").is_enabled()
    deadline = time.monotonic() + 20
    while server.health()["active"] and time.monotonic() < deadline:
        time.sleep(0.2)
    h = server.health()
    assert h["active"] == 0 and h["cancelled"] >= 1, h
    page.screenshot(path=str(shots / "chat-stopped.png"), full_page=True)
    assert not errors, errors
    context.close()

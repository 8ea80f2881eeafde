"""The chat page (Vue) in headless Chromium against the real gateway (DESIGN.md §4.2; issue: the Vue front end).

Pages are loaded through a TCP relay where a test breaks the network mid-stream, the way a
phone on flaky Wi-Fi does, to watch each transport resume.
"""

from __future__ import annotations

import asyncio
import logging
import re

import pytest
from aiohttp import web
from chat_page import (
    ANSWER,
    TRANSPORTS,
    ask,
    open_page,
    shown,
    state,
    wait_state,
    wait_words,
)


@pytest.fixture(autouse=True)
def page_is_built(built_page):
    """Every test here needs the built chat page (shipped in sse_gateway/static)."""


def stream_requests(caplog) -> int:
    """How many requests opened (or re-opened) an answer stream at the gateway so far."""
    pattern = re.compile(r" (GET /v1/streams/[\w-]+|POST /v1/chat/completions) ")
    return sum(bool(pattern.search(record.getMessage())) for record in caplog.records)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_the_answer_types_itself_out(start_gateway, mock_model, browser, artifacts, transport):
    mock_model.token_delay = 0.03
    gateway = start_gateway()
    page = await open_page(browser, gateway.url)
    text = " ".join(f"word{i}" for i in range(80))
    await ask(page, text, transport)
    # The text grows while the model is still writing: seen at several points, not all at once.
    for words in (1, 20, 50):
        await wait_words(page, words)
        assert await state(page) == "streaming"
        assert len((await shown(page)).split()) < 80
    await wait_state(page, "done")
    assert await shown(page) == text
    await page.screenshot(path=str(artifacts / f"answer-{transport}.png"), full_page=True)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_broken_connection_resumes_without_duplicated_text(start_gateway, mock_model, relay, browser, caplog,
                                                                    artifacts, transport):
    caplog.set_level(logging.INFO, logger="sse_gateway.access")
    mock_model.token_delay = 0.03
    gateway = start_gateway(retry_ms=300)
    network = await relay(gateway.port)
    page = await open_page(browser, network.url)
    text = " ".join(f"word{i}" for i in range(80))
    await ask(page, text, transport)
    await wait_words(page, 15)
    before = await shown(page)
    network.break_all()  # every connection between browser and gateway is reset
    await wait_state(page, "reconnecting")
    await wait_state(page, "done")
    await page.screenshot(path=str(artifacts / f"resumed-{transport}.png"), full_page=True)
    assert await shown(page) == text  # every word exactly once, in order
    assert text.startswith(before) and len(before) < len(text)
    assert sum(r.last_user_text == text for r in mock_model.requests) == 1  # one generation
    assert stream_requests(caplog) >= 2  # the page came back on its own
    if transport == "eventsource":
        # After [DONE] the page closed its EventSource: no reconnect loop follows.
        assert await page.evaluate("window.lastEventSource.readyState") == 2  # CLOSED
        requests = stream_requests(caplog)
        await asyncio.sleep(1.5)  # five reconnection delays: a loop would have shown by now
        assert stream_requests(caplog) == requests


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_stop_halts_the_answer_and_the_model(start_gateway, mock_model, browser, transport):
    mock_model.token_delay = 0.05
    gateway = start_gateway()
    page = await open_page(browser, gateway.url)
    text = " ".join(f"w{i}" for i in range(200))
    await ask(page, text, transport)
    await wait_words(page, 5)
    await page.click("#stop")
    await wait_state(page, "stopped")
    record = mock_model.find(text)
    await asyncio.wait_for(mock_model.wait_for(lambda: record.state != "open"), timeout=2)
    assert record.state == "cancelled"
    partial = await shown(page)
    assert text.startswith(partial) and 5 <= len(partial.split()) < 200
    assert await page.is_enabled("#ask")


async def test_sign_in_with_a_key_and_a_wrong_key_is_explained(start_gateway, browser, artifacts):
    gateway = start_gateway(api_keys={"right-key": "alice"})
    page = await open_page(browser, gateway.url)
    assert await page.is_visible("#key")  # the gateway asked for a key (401 on the model list)
    await page.fill("#key", "wrong-key")
    await page.click("#sign-in")
    await page.wait_for_selector("#problem")
    assert "Not signed in: Incorrect API key provided." in await page.text_content("#problem")
    await page.screenshot(path=str(artifacts / "wrong-key.png"))
    await page.fill("#key", "right-key")
    await page.click("#sign-in")
    await page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    assert "alice" in await page.text_content(".user")
    # The key was traded for an HttpOnly cookie: no script can read it.
    assert await page.evaluate("document.cookie") == ""
    for transport in TRANSPORTS:
        await ask(page, f"signed in via {transport}", transport)
        await wait_state(page, "done")
        assert await shown(page) == f"signed in via {transport}"


async def test_model_output_is_rendered_as_markdown_and_never_as_html(start_gateway, browser):
    gateway = start_gateway()
    page = await open_page(browser, gateway.url)
    text = '**bold** <img src=x onerror="alert(1)"> <script>alert(2)</script> [a](javascript:alert(3))\n\n```\ncode <b>block</b>\n```'
    await ask(page, text, "fetch")
    await wait_state(page, "done")
    answer = page.locator(ANSWER)
    assert await answer.locator("strong").inner_text() == "bold"
    assert "code <b>block</b>" in await answer.locator("pre code").inner_text()
    assert await answer.locator("img, script, b").count() == 0  # the HTML is shown, not obeyed
    assert '<img src=x onerror="alert(1)">' in await answer.inner_text()
    hrefs = await answer.locator("a").evaluate_all("links => links.map(a => a.getAttribute('href'))")
    assert not any(h and h.startswith("javascript:") for h in hrefs)
    assert page.dialogs == []


async def test_the_history_goes_with_each_question_after_the_servers_system_prompt(start_gateway, mock_model, browser):
    gateway = start_gateway(system_prompt="You are the support assistant of Example Corp.")
    page = await open_page(browser, gateway.url)
    await ask(page, "first question", "eventsource")
    await wait_state(page, "done")
    await ask(page, "second question", "fetch")
    await wait_state(page, "done")
    assert await page.locator(".message").count() == 4
    messages = mock_model.find("second question").body["messages"]
    assert messages == [
        {"role": "system", "content": "You are the support assistant of Example Corp."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first question"},
        {"role": "user", "content": "second question"},
    ]


@pytest.mark.parametrize(("status", "expected"), [(429, "Too many requests; try again in 7 s"), (503, "The service failed (502)")])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_upstream_refusals_are_explained(start_gateway, scripted_upstream, browser, status, expected, transport):
    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "Slow down.", "type": "x", "code": None}}, status=status,
                                 headers={"Retry-After": "7"})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    gateway = start_gateway(upstream_url=await scripted_upstream(refuse, models=models))
    page = await open_page(browser, gateway.url)
    await ask(page, "anyone there?", transport)
    await wait_state(page, "error")
    assert expected in await page.text_content("#problem")
    assert await page.locator(".message.assistant").count() == 0  # no empty answer left behind


async def test_the_page_works_under_its_content_security_policy(start_gateway, browser, http):
    gateway = start_gateway()
    response = await http.get(f"{gateway.url}/")
    policy = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy and "unsafe" not in policy
    page = await open_page(browser, gateway.url, enforce_csp=True)
    violations = []
    page.on("console", lambda message: violations.append(message.text) if "Content Security Policy" in message.text else None)
    for transport in TRANSPORTS:
        await ask(page, f"under the policy via {transport}", transport)
        await page.locator("main[data-state=done]").wait_for()
        assert (await page.locator(ANSWER).inner_text()).strip() == f"under the policy via {transport}"
    # Highlighted code, its copy button and a table: class names and markup only, no inline style.
    await ask(page, "```python\nimport os\n```\n\n| a |\n|---|\n| 1 |", "fetch")
    await page.locator("main[data-state=done]").wait_for()
    assert await page.locator(f"{ANSWER} .hljs-keyword").inner_text() == "import"
    assert await page.locator(f"{ANSWER} button.copy").count() == 1
    assert await page.locator(f"{ANSWER} td").inner_text() == "1"
    assert violations == []

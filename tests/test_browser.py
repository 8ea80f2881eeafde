"""Headless Chromium's own EventSource and fetch against the gateway's page (DESIGN.md §4.2).

The page is loaded through a TCP relay, so that a test can break the network mid-stream the
way a phone on flaky Wi-Fi does, and watch the browser's automatic reconnect resume the stream.
"""

from __future__ import annotations

import asyncio
import logging
import re

ANSWER = "#answer"
STATE = "document.body.dataset.state"


def stream_gets(caplog) -> int:
    """How many GET /v1/streams/<id> requests the gateway has answered so far."""
    return sum(bool(re.search(r" GET /v1/streams/[\w-]+ ", r.getMessage())) for r in caplog.records)


async def ask(page, text: str, transport: str) -> None:
    await page.fill("#question", text)
    await page.select_option("#transport", transport)
    await page.click("#send")


async def test_eventsource_resumes_a_broken_stream_exactly_once(start_gateway, mock_model, relay, browser, caplog, artifacts):
    caplog.set_level(logging.INFO, logger="sse_gateway.access")
    mock_model.token_delay = 0.03
    gateway = start_gateway(retry_ms=300)
    network = await relay(gateway.port)
    page = await browser.new_page()
    await page.goto(f"{network.url}/")
    text = " ".join(f"word{i}" for i in range(80))
    await ask(page, text, "eventsource")

    # Mid-stream, every connection between the browser and the gateway breaks.
    await page.wait_for_function(f"document.querySelector('{ANSWER}').textContent.length > 60")
    shown_before = await page.text_content(ANSWER)
    network.break_all()
    await page.wait_for_function(f"{STATE} === 'reconnecting'")
    await page.wait_for_function(f"{STATE} === 'done'", timeout=20_000)
    await page.screenshot(path=str(artifacts / "eventsource-resumed.png"))

    shown = await page.text_content(ANSWER)
    assert shown == text  # every word exactly once, in order
    assert text.startswith(shown_before) and len(shown_before) < len(text)
    assert sum(r.last_user_text == text for r in mock_model.requests) == 1  # one generation
    assert stream_gets(caplog) >= 2  # the browser came back on its own

    # After [DONE] the page closed its EventSource: no reconnect loop follows.
    assert await page.evaluate("window.lastEventSource.readyState") == 2  # CLOSED
    gets = stream_gets(caplog)
    await asyncio.sleep(1.5)  # five reconnection delays: a loop would have shown by now
    assert stream_gets(caplog) == gets


async def test_fetch_transport_streams_the_answer(start_gateway, mock_model, browser, artifacts):
    mock_model.token_delay = 0.01
    gateway = start_gateway()
    page = await browser.new_page()
    await page.goto(f"{gateway.url}/")
    text = "fetch streaming in a real browser 中文 😀"
    await ask(page, text, "fetch")
    await page.wait_for_function(f"{STATE} === 'done'")
    assert await page.text_content(ANSWER) == text
    await page.screenshot(path=str(artifacts / "fetch-done.png"))


async def test_stop_button_cancels_the_model(start_gateway, mock_model, browser):
    mock_model.token_delay = 0.05
    gateway = start_gateway()
    page = await browser.new_page()
    await page.goto(f"{gateway.url}/")
    text = " ".join(f"w{i}" for i in range(200))
    await ask(page, text, "eventsource")
    await page.wait_for_function(f"document.querySelector('{ANSWER}').textContent.length > 10")
    await page.click("#stop")
    await page.wait_for_function(f"{STATE} === 'done'")
    record = mock_model.find(text)
    await asyncio.wait_for(mock_model.wait_for(lambda: record.state != "open"), timeout=2)
    assert record.state == "cancelled"
    shown = await page.text_content(ANSWER)
    assert text.startswith(shown) and len(shown) < len(text)


async def test_a_wrong_key_shows_its_message(start_gateway, browser):
    gateway = start_gateway(api_keys={"right-key": "alice"})
    page = await browser.new_page()
    await page.goto(f"{gateway.url}/")
    await page.fill("#key", "wrong-key")
    await ask(page, "hello", "eventsource")
    await page.wait_for_function(f"{STATE} === 'error'")
    assert "Incorrect API key provided." in await page.text_content("#state")

"""The chat page as people use it (issue 12): it follows the answer, survives a reload, a second
tab and a restart of the gateway, explains failures, works from the keyboard, and reads well in
light and dark mode on a desktop and a phone. Headless Chromium against real gateways.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import pytest
from aiohttp import web
from chat_page import (
    ANSWER,
    TRANSPORTS,
    ask,
    open_page,
    ready,
    shown,
    state,
    wait_state,
    wait_words,
)
from conftest import store_url

REPO = Path(__file__).resolve().parents[1]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
SCROLL_GAP = "(() => { const el = document.querySelector('#conversation'); return el.scrollHeight - el.scrollTop - el.clientHeight; })()"


@pytest.fixture(autouse=True)
def page_is_built(built_page):
    """Every test here needs the built chat page (shipped in sse_gateway/static)."""


def lines(count: int, prefix: str = "line") -> str:
    """A question whose echo is `count` paragraphs: an answer taller than the window."""
    return "\n\n".join(f"{prefix}{i}" for i in range(count))


def words(count: int, prefix: str = "w") -> str:
    return " ".join(f"{prefix}{i}" for i in range(count))


def answer_text(markdown: str) -> str:
    """What the page shows of an echoed answer of paragraphs: their text, a newline apart."""
    return "\n".join(part for part in markdown.split("\n\n"))


async def generations(mock_model, text: str) -> int:
    return sum(r.last_user_text == text for r in mock_model.requests)


# ---- following the answer ---------------------------------------------------------------------

async def test_the_page_follows_the_answer_until_the_user_scrolls_up(start_gateway, mock_model, browser):
    mock_model.token_delay = 0.03
    gateway = start_gateway()
    page = await open_page(browser, gateway.url, viewport=DESKTOP)
    text = lines(150)
    await ask(page, text)
    # While it streams, the latest line stays in view: the conversation scrolls by itself.
    for count in (30, 60):
        await wait_words(page, count)
        assert await page.evaluate(SCROLL_GAP) < 48
    assert not await page.is_visible("#jump")
    # The user scrolls up to read: the page stops following and offers a way back.
    await page.hover("#conversation")
    await page.mouse.wheel(0, -3000)
    await page.locator("#jump").wait_for()
    top = await page.evaluate("document.querySelector('#conversation').scrollTop")
    await wait_words(page, 90)
    assert await page.evaluate("document.querySelector('#conversation').scrollTop") == top  # left where the user is
    assert await page.evaluate(SCROLL_GAP) > 200
    await page.click("#jump")
    assert await page.evaluate(SCROLL_GAP) < 48
    assert not await page.is_visible("#jump")
    await wait_words(page, 120)
    assert await page.evaluate(SCROLL_GAP) < 48  # following again
    await wait_state(page, "done")
    assert await page.evaluate(SCROLL_GAP) < 48


# ---- a reload, a second tab -------------------------------------------------------------------

@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_reload_during_an_answer_resumes_it_exactly(start_gateway, mock_model, browser, transport):
    mock_model.token_delay = 0.03
    gateway = start_gateway()
    page = await open_page(browser, gateway.url)
    await ask(page, "an earlier question", transport)
    await wait_state(page, "done")
    text = words(150)
    await ask(page, text, transport)
    await wait_words(page, 25)
    await page.reload()  # the reader goes; the gateway keeps the answer for the grace period
    await ready(page)
    await wait_state(page, "done")
    assert await shown(page) == text  # every word once, in order: no gap, no repeat
    assert await generations(mock_model, text) == 1  # the same answer, not a new one
    # The conversation came back from the browser's storage.
    assert await page.locator(".message.user .content").all_inner_texts() == ["an earlier question", text]
    assert await page.locator(".message.assistant").count() == 2
    # Another reload finds it whole, and asks the gateway for nothing.
    await page.reload()
    await ready(page)
    assert await shown(page) == text and await page.locator(".message").count() == 4
    assert await generations(mock_model, text) == 1


async def test_a_resumed_answer_comes_back_after_a_network_break_too(start_gateway, mock_model, relay, browser):
    """After a reload the page reads on with GET /v1/streams/<id>; a break of that connection is
    resumed as well (one Last-Event-ID header, not the old and the new merged)."""
    mock_model.token_delay = 0.03
    gateway = start_gateway()
    network = await relay(gateway.port)
    page = await open_page(browser, network.url)
    text = words(150)
    await ask(page, text, "fetch")
    await wait_words(page, 20)
    await page.reload()
    await ready(page)
    await wait_words(page, 45)
    network.break_all()
    await wait_state(page, "done")
    assert await shown(page) == text
    assert await generations(mock_model, text) == 1


async def test_a_reload_before_the_stream_is_known_attaches_to_it(start_gateway, mock_model, browser):
    """The upstream is slow to answer, so the page has no stream id yet when it is reloaded (and
    a second tab opens): both find the answer by the request's Idempotency-Key, none starts it
    again, none marks it interrupted."""
    mock_model.controls = {"mock_head_delay": 6}
    gateway = start_gateway(heartbeat_interval=10)
    first = await open_page(browser, gateway.url)
    text = words(20)
    await ask(first, text, "fetch")
    second = await open_page(browser, gateway.url, context=first.context)
    await second.locator(".message.assistant[data-status=streaming]").wait_for()
    await first.reload()
    await ready(first)
    for page in (first, second):
        await wait_state(page, "done", timeout=30_000)
        assert await shown(page) == text
    assert await generations(mock_model, text) == 1
    assert await first.locator("[data-status=interrupted]").count() == 0


async def test_a_second_tab_follows_the_same_answer(start_gateway, mock_model, browser, caplog):
    mock_model.token_delay = 0.03
    gateway = start_gateway()
    first = await open_page(browser, gateway.url)
    second = await open_page(browser, gateway.url, context=first.context)  # same browser profile
    text = words(150)
    await ask(first, text, "fetch")
    await wait_words(second, 10)  # the second tab picked the answer up from the first's storage
    assert await second.locator(".message.user .content").inner_text() == text
    await wait_words(first, 60)
    third = await open_page(browser, gateway.url, context=first.context)  # opened mid-answer
    for page in (first, second, third):
        await wait_state(page, "done")
        assert await shown(page) == text
    assert await generations(mock_model, text) == 1  # each tab read the same stream
    # Stop in one tab stops the answer in every tab.
    text = words(300, "s")
    await ask(second, text, "eventsource")
    await wait_words(first, 10)
    await first.click("#stop")
    for page in (first, second, third):
        await page.locator(".message.assistant:last-of-type[data-status=stopped]").wait_for()
    record = mock_model.find(text)
    await asyncio.wait_for(mock_model.wait_for(lambda: record.state != "open"), timeout=5)
    assert record.state == "cancelled"


# ---- a restart of the gateway ----------------------------------------------------------------

async def start_instance(programs, redis: str, *flags: str):
    server = await programs(sys.executable, str(REPO / "sse_server.py"), "--port=0", f"--redis-url={redis}",
                            "--mock-token-delay=0.05", "--resume-grace=30", *flags)
    port = int((await server.wait_for_line(r"listening on http://[\d.]+:(\d+)")).group(1))
    return server, port


async def test_a_restart_mid_answer_resumes_on_another_instance(programs, relay, browser, request):
    """The page reads through instance A an answer that instance B generates; A restarts: the page
    comes back through B, and the answer arrives whole."""
    redis = store_url(request, "redis")
    b, b_port = await start_instance(programs, redis)
    a, a_port = await start_instance(programs, redis)
    network = await relay(b_port)
    page = await open_page(browser, network.url)
    text = words(200)
    await ask(page, text, "eventsource")
    await wait_words(page, 10)
    network.target_port = a_port  # the next connection goes to A (the load balancer's choice)
    network.break_all()
    await wait_words(page, len((await shown(page)).split()) + 10)  # words that came through A
    restart = len(b.lines)
    a.proc.send_signal(signal.SIGTERM)
    network.target_port = b_port  # A is gone from the pool
    assert await a.stop(sig=None) == 0
    await wait_state(page, "done", timeout=40_000)
    assert await shown(page) == text
    assert "Last-Event-ID" not in await page.inner_text("main")
    assert await b.stop() == 0
    assert any(" GET /v1/streams/" in line for line in a.lines)  # A had the page's connection
    assert any(" GET /v1/streams/" in line for line in b.lines[restart:])  # then B, for the rest


async def test_an_answer_cut_by_a_restart_is_told_plainly_and_can_be_asked_again(programs, relay, browser, request):
    """Instance A generates the answer and restarts before it is done (its drain runs out): the
    page resumes through instance B, finds the answer ends there, and says so without protocol
    talk; Regenerate asks again, through B."""
    redis = store_url(request, "redis")
    b, b_port = await start_instance(programs, redis)
    a, a_port = await start_instance(programs, redis, "--drain-timeout=0.5")
    network = await relay(a_port)
    page = await open_page(browser, network.url)
    text = words(300)
    await ask(page, text, "eventsource")
    await wait_words(page, 10)
    network.target_port = b_port
    a.proc.send_signal(signal.SIGTERM)
    await page.locator(".message.assistant[data-status=interrupted]").wait_for(timeout=30_000)
    assert await a.stop(sig=None) == 0
    await b.wait_for_line(r" GET /v1/streams/")  # the page came to B for the rest
    partial = await shown(page)
    assert text.startswith(partial) and 10 <= len(partial.split()) < 300  # what A wrote, once
    assert await state(page) == "interrupted"
    note = await page.inner_text(".message.assistant .note")
    assert "server restarted" in note
    assert "Last-Event-ID" not in await page.inner_text("main")
    await page.click(".regenerate")
    await wait_state(page, "done", timeout=40_000)
    assert await shown(page) == text
    assert await page.locator(".message").count() == 2


# ---- error paths ------------------------------------------------------------------------------

def echo_chunks(text: str) -> bytes:
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
             "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()


async def test_nothing_is_sent_without_a_model(start_gateway, scripted_upstream, browser):
    asked = []

    async def chat(request: web.Request) -> web.Response:
        asked.append(await request.json())
        return web.json_response({})

    async def no_models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    gateway = start_gateway(upstream_url=await scripted_upstream(chat, models=no_models))
    page = await open_page(browser, gateway.url)
    assert not await page.is_enabled("#ask")
    await page.fill("#question", "anyone?")
    await page.press("#question", "Enter")  # Enter sends no more than the button would
    await page.locator("#problem").wait_for()
    assert "No model is available" in await page.inner_text("#problem")
    assert asked == [] and await page.locator(".message").count() == 0
    assert await page.input_value("#question") == "anyone?"  # the question is kept for later


async def test_a_failed_question_can_be_retried_and_leaves_no_orphan_turn(start_gateway, scripted_upstream, browser):
    asked: list[dict] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        asked.append(body)
        if len(asked) in (1, 3):  # the first question, and the first of the next one
            return web.json_response({"error": {"message": "Overloaded.", "type": "server_error", "code": None}}, status=503)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(echo_chunks(body["messages"][-1]["content"]))
        return response

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    gateway = start_gateway(upstream_url=await scripted_upstream(chat, models=models))
    page = await open_page(browser, gateway.url)
    await ask(page, "first")
    await page.locator(".message.user[data-status=failed]").wait_for()
    assert "The service failed (502)" in await page.inner_text("#problem")
    assert await page.locator(".message.assistant").count() == 0
    await page.click(".retry")
    await wait_state(page, "done")
    assert await shown(page) == "first"
    assert [m["content"] for m in asked[1]["messages"]] == ["first"]  # one user turn, not two
    # A failed question followed by a new one: the failed turn leaves the conversation.
    await ask(page, "second")
    await page.locator(".message.user[data-status=failed]").wait_for()
    await ask(page, "third")
    await wait_state(page, "done")
    assert [(m["role"], m["content"]) for m in asked[-1]["messages"]] == [
        ("user", "first"), ("assistant", "first"), ("user", "third")]
    assert await page.locator(".message .content").all_inner_texts() == ["first", "first", "third", "third"]


async def test_regenerate_asks_the_last_question_again(start_gateway, mock_model, browser):
    gateway = start_gateway()
    page = await open_page(browser, gateway.url)
    await ask(page, "one")
    await wait_state(page, "done")
    await ask(page, "two")
    await wait_state(page, "done")
    assert await page.locator(".regenerate").count() == 1  # the last answer only
    await page.click(".regenerate")
    await wait_state(page, "done")
    assert await generations(mock_model, "two") == 2
    assert [(m["role"], m["content"]) for m in mock_model.requests[-1].body["messages"]] == [
        ("user", "one"), ("assistant", "one"), ("user", "two")]
    assert await page.locator(".message .content").all_inner_texts() == ["one", "one", "two", "two"]


async def test_who_is_signed_in_comes_back_after_a_reload(start_gateway, browser):
    gateway = start_gateway(api_keys={"alice-key": "alice", "bob-key": "bob"})
    page = await open_page(browser, gateway.url)

    async def sign_in(key: str) -> None:
        await page.fill("#key", key)
        await page.click("#sign-in")
        await page.locator("#model option").first.wait_for(state="attached")

    await sign_in("alice-key")
    await ask(page, "alice's question")
    await wait_state(page, "done")
    await page.reload()
    await ready(page)
    assert await page.inner_text(".user .name") == "alice"
    assert await page.is_visible("#sign-out") and not await page.is_visible("#key")
    assert await shown(page) == "alice's question"
    await page.click("#sign-out")
    await page.locator("#key").wait_for()
    assert await page.locator(".message").count() == 0  # alice's conversation is not shown to whoever comes next
    await sign_in("bob-key")
    assert await page.locator(".message").count() == 0  # each user has their own
    await page.click("#sign-out")
    await sign_in("alice-key")
    assert await shown(page) == "alice's question"


# ---- keyboard, rendering, accessibility --------------------------------------------------------

async def test_the_page_works_from_the_keyboard(start_gateway, mock_model, browser):
    mock_model.token_delay = 0.05
    gateway = start_gateway()
    page = await open_page(browser, gateway.url)
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.id") == "question"  # the first stop
    await page.keyboard.type("line one")
    await page.keyboard.press("Shift+Enter")
    await page.keyboard.type("line two")
    await page.keyboard.press("Enter")
    await wait_state(page, "done")
    assert await page.inner_text(".message.user .content") == "line one\nline two"
    assert await page.evaluate("document.activeElement.id") == "question"  # ready for the next one
    await page.keyboard.type(words(200))
    await page.keyboard.press("Enter")
    await wait_words(page, 5)
    await page.keyboard.press("Escape")  # stops the answer
    await wait_state(page, "stopped")
    # Tab reaches Regenerate; Enter presses it.
    for _ in range(30):
        await page.keyboard.press("Shift+Tab")
        if await page.evaluate("document.activeElement.className") == "regenerate":
            break
    else:
        pytest.fail("Regenerate is not reachable with the keyboard")
    await page.keyboard.press("Enter")
    await wait_state(page, "streaming", "done")
    assert await page.locator(".message.assistant").count() == 2


async def test_a_token_changes_only_its_own_message(start_gateway, mock_model, browser):
    """Rendering cost per token does not grow with the conversation: earlier messages are left
    alone, and the streaming one changes at most once per animation frame."""
    mock_model.token_delay = 0.005
    gateway = start_gateway()
    page = await open_page(browser, gateway.url)
    for i in range(6):
        await ask(page, f"earlier **question** {i}\n\n```python\nprint({i})\n```")
        await wait_state(page, "done")
    await ask(page, words(200))
    await wait_words(page, 5)
    await page.evaluate("""() => {
        window.changed = new Set(); window.frames_ = 0; window.updates = 0;
        const articles = [...document.querySelectorAll('#conversation article')];
        new MutationObserver((records) => {
            window.updates += 1;
            for (const r of records) {
                const article = (r.target.nodeType === 1 ? r.target : r.target.parentElement).closest('article');
                window.changed.add(article ? articles.indexOf(article) : 'outside');
            }
        }).observe(document.querySelector('#conversation'), {subtree: true, childList: true, characterData: true, attributes: true});
        const tick = () => { window.frames_ += 1; requestAnimationFrame(tick); };
        requestAnimationFrame(tick);
    }""")
    await wait_state(page, "done")
    assert await page.evaluate("[...window.changed]") == [13]  # the answer streaming, nothing else
    updates, frames = await page.evaluate("[window.updates, window.frames_]")
    assert updates <= frames + 2  # DOM updates batched per frame, not one per token (200 tokens)


async def test_code_tables_and_the_live_region(start_gateway, mock_model, browser, http):
    mock_model.token_delay = 0.02
    gateway = start_gateway()
    page = await open_page(browser, gateway.url, permissions=["clipboard-read", "clipboard-write"])
    assert await page.get_by_label("Your message").get_attribute("id") == "question"  # a labelled textarea
    assert await page.locator("[aria-live]").count() == 1  # not on the conversation: no token is read out
    text = "Intro " + words(30) + "\n\n```python\ndef greet(name):\n    return f'hi {name}'\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |"
    await ask(page, text)
    await wait_words(page, 10)
    assert await page.inner_text("#announcer") == ""  # nothing announced while it streams
    await wait_state(page, "done")
    assert "Answer: Intro w0" in await page.inner_text("#announcer")
    answer = page.locator(ANSWER)
    assert await answer.locator("pre code .hljs-keyword").first.inner_text() == "def"
    assert await answer.locator(".code-head span").inner_text() == "python"
    await answer.locator("button.copy").click()
    await answer.locator("button.copy", has_text="Copied").wait_for()
    assert await page.evaluate("navigator.clipboard.readText()") == "def greet(name):\n    return f'hi {name}'\n"
    border = await answer.locator("td").first.evaluate("td => getComputedStyle(td).borderTopWidth")
    assert border == "1px"
    favicon = await page.evaluate("document.querySelector('link[rel=icon]').href")
    response = await http.get(favicon)
    assert response.status == 200 and response.headers["Content-Type"] == "image/svg+xml"


CONTRAST = """() => {
    const rgb = (s) => s.match(/[\\d.]+/g).map(Number);
    const lum = ([r, g, b]) => {
        const f = (c) => { c /= 255; return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; };
        return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
    };
    const background = (el) => {
        for (; el; el = el.parentElement) {
            const c = rgb(getComputedStyle(el).backgroundColor);
            if (c.length < 4 || c[3] > 0) return c.slice(0, 3);
        }
        return rgb(getComputedStyle(document.documentElement).backgroundColor).slice(0, 3);
    };
    const out = {};
    for (const sel of ['h1', '#state', '.message.user .content', '.message.assistant .content p', '.code-head span',
                       '.markdown td', 'label[for=model]', '#new', '#ask', '.regenerate', '.user .name']) {
        const el = document.querySelector(sel);
        if (!el) continue;
        const a = lum(rgb(getComputedStyle(el).color)), b = lum(background(el));
        out[sel] = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    }
    out.page = lum(background(document.querySelector('#conversation')));
    return out;
}"""


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize("size", ["desktop", "phone"])
async def test_screens_in_light_and_dark_on_a_desktop_and_a_phone(start_gateway, mock_model, browser, artifacts, scheme, size):
    gateway = start_gateway(api_keys={"alice-key": "alice"})
    viewport = DESKTOP if size == "desktop" else PHONE
    page = await open_page(browser, gateway.url, color_scheme=scheme, viewport=viewport,
                           is_mobile=size == "phone", has_touch=size == "phone")
    failed = []
    page.on("response", lambda r: failed.append(r.url) if r.status >= 400 and "/v1/" not in r.url else None)
    await page.fill("#key", "alice-key")
    await page.click("#sign-in")
    await page.locator("#model option").first.wait_for(state="attached")
    text = ("## Streaming, token by token\n\nThe gateway relays each **token** as it arrives, "
            "with `id:` lines for resume.\n\n```python\nasync for chunk in stream:\n    print(chunk)\n```\n\n"
            "| transport | resumes |\n|---|---|\n| EventSource | by itself |\n| fetch | with Last-Event-ID |")
    await ask(page, text)
    await wait_state(page, "done")
    await page.screenshot(path=str(artifacts / f"{size}-{scheme}.png"))
    contrast = await page.evaluate(CONTRAST)
    page_luminance = contrast.pop("page")
    assert (page_luminance < 0.05) if scheme == "dark" else (page_luminance > 0.85)
    assert len(contrast) >= 10
    low = {selector: round(ratio, 2) for selector, ratio in contrast.items() if ratio < 4.5}
    assert low == {}  # WCAG AA for text
    # Nothing wider than the screen, nothing missing (favicon included).
    assert await page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
    assert failed == []
    for selector in ("#question", "#ask", "#stop", ".regenerate", ".user .name"):
        box = await page.locator(selector).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= viewport["width"]

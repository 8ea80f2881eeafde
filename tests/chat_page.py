"""Driving the chat page in headless Chromium (Playwright): open it, ask, read what it shows."""

from __future__ import annotations

from typing import Any

ANSWER = ".message.assistant:last-of-type .content"
STATE = "document.querySelector('main').dataset.state"
TRANSPORTS = ["eventsource", "fetch"]


async def open_page(browser: Any, url: str, *, enforce_csp: bool = False, context: Any = None, **options: Any) -> Any:
    """A new page (in `context`, or a new browser context made with `options`) showing the chat page."""
    # The page's Content-Security-Policy forbids eval, which Playwright's wait_for_function
    # needs: tests instrument the page with the policy lifted, except where it is the subject.
    if context is None:
        context = await browser.new_context(bypass_csp=not enforce_csp, **options)
    page = await context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: dialogs.append(dialog.message))
    page.dialogs = dialogs
    await page.goto(f"{url}/")
    await ready(page)
    return page


async def ready(page: Any) -> None:
    """Wait until the page has asked the gateway for its models (or for a key)."""
    await page.locator("#model option, #key").first.wait_for(state="attached")


async def ask(page: Any, text: str, transport: str = "eventsource") -> None:
    await page.select_option("#transport", transport)
    await page.fill("#question", text)
    await page.click("#ask")


async def shown(page: Any) -> str:
    return (await page.text_content(ANSWER) or "").strip()


async def state(page: Any) -> str:
    return await page.evaluate(STATE)


async def wait_state(page: Any, *states: str, timeout: float = 20_000) -> None:
    await page.wait_for_function(f"{list(states)}.includes({STATE})", timeout=timeout)


async def wait_words(page: Any, count: int, timeout: float = 20_000) -> None:
    await page.wait_for_function(
        f"(document.querySelector('{ANSWER}')?.textContent || '').trim().split(/\\s+/).filter(Boolean).length >= {count}",
        timeout=timeout,
    )

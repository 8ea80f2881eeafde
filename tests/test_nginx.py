"""Behind a real nginx: the shipped deploy/nginx.conf, and a plain proxy_pass (issue: Nginx deployment).

Whether frames pass "one by one" is judged by events, not by a clock: when the client gets frame
k, the mock model must not yet have written much beyond it. A buffering proxy delivers the first
frame only once the model is done, which the negative controls show the tests would notice.
"""

from __future__ import annotations

import aiohttp
from conftest import shipped_nginx_site
from support import EventReader, chat_body, content_of
from test_browser import ask, open_page, shown, wait_state, wait_words

TEXT = " ".join(f"w{i}" for i in range(10))
WRITTEN = 10 + 4  # the mock writes the role chunk, ten words, the finish chunk, usage, [DONE]
FRAMES = WRITTEN - 1  # the client gets all but the usage chunk, which it did not ask for


async def arrivals(http, url: str, mock_model, body) -> tuple[list[int], EventReader]:
    """For each event the client gets, how many frames the mock model had written by then."""
    response = await http.post(f"{url}/v1/chat/completions", json=body)
    assert response.status == 200, await response.text()
    reader = EventReader(response)
    written = []
    try:
        while await reader.next_event() is not None:
            written.append(mock_model.find(body["messages"][0]["content"]).chunks_sent)
    except aiohttp.ClientPayloadError:
        pass  # the proxy cut the response: the caller looks at what did arrive
    return written, reader


def one_by_one(written: list[int]) -> bool:
    # Frame k reached the client before the model wrote frame k+2 (one frame of slack for the race).
    return len(written) == FRAMES and all(count <= k + 2 for k, count in enumerate(written))


def plain_site(port: int, extra: str = "") -> str:
    return f"server {{ listen 80; location / {{ proxy_pass http://127.0.0.1:{port}; {extra} }} }}"


async def test_frames_pass_the_shipped_config_one_by_one(start_gateway, mock_model, nginx, http, tmp_path):
    gateway = start_gateway()
    proxy = nginx(shipped_nginx_site([gateway.port], tmp_path))
    written, reader = await arrivals(http, proxy.url, mock_model, chat_body(TEXT, mock_token_delay=0.2))
    assert one_by_one(written), written
    assert content_of(reader.events) == TEXT


async def test_a_plain_proxy_pass_stays_unbuffered_thanks_to_the_header(start_gateway, mock_model, nginx, http):
    gateway = start_gateway()
    proxy = nginx(plain_site(gateway.port))  # no buffering directives at all
    written, _reader = await arrivals(http, proxy.url, mock_model, chat_body(TEXT, mock_token_delay=0.2))
    assert one_by_one(written), written


async def test_negative_control_nginx_buffers_when_it_ignores_the_header(start_gateway, mock_model, nginx, http):
    # The same plain config told to ignore X-Accel-Buffering: nginx then holds the frames back,
    # and the first one arrives only when the model is done. This is what the header prevents.
    gateway = start_gateway()
    proxy = nginx(plain_site(gateway.port, "proxy_ignore_headers X-Accel-Buffering;"))
    written, reader = await arrivals(http, proxy.url, mock_model, chat_body(TEXT, mock_token_delay=0.1))
    assert written[0] == WRITTEN and not one_by_one(written)
    assert content_of(reader.events) == TEXT


async def test_a_model_silent_longer_than_the_read_timeout_survives(start_gateway, mock_model, nginx, http, tmp_path):
    gateway = start_gateway(heartbeat_interval=1)
    proxy = nginx(shipped_nginx_site([gateway.port], tmp_path, read_timeout="2s"))
    body = chat_body(TEXT, mock_first_token_delay=5)  # five seconds of thinking, 2 s read timeout
    _written, reader = await arrivals(http, proxy.url, mock_model, body)
    assert content_of(reader.events) == TEXT and reader.events[-1].data == "[DONE]"
    assert len(reader.comments) >= 4  # heartbeats kept nginx from timing out


async def test_negative_control_without_heartbeats_nginx_cuts_the_silent_stream(start_gateway, mock_model, nginx, http, tmp_path):
    gateway = start_gateway(heartbeat_interval=30)
    proxy = nginx(shipped_nginx_site([gateway.port], tmp_path, read_timeout="2s"))
    _written, reader = await arrivals(http, proxy.url, mock_model, chat_body(TEXT, mock_first_token_delay=5))
    assert not reader.events or reader.events[-1].data != "[DONE]"  # cut off after 2 s of silence


async def test_eventsource_resumes_through_nginx_on_the_other_instance(start_gateway, redis_url, mock_model, relay,
                                                                        nginx, browser, tmp_path, artifacts):
    mock_model.token_delay = 0.05
    gateways = [start_gateway(redis_url=redis_url, retry_ms=300) for _ in range(2)]
    relays = [await relay(gateway.port) for gateway in gateways]  # the network to each instance
    proxy = nginx(shipped_nginx_site([r.port for r in relays], tmp_path))
    page = await open_page(browser, proxy.url)
    text = " ".join(f"word{i}" for i in range(80))
    await ask(page, text, "eventsource")
    await wait_words(page, 15)
    serving = [i for i, gateway in enumerate(gateways) if gateway.services.metrics.connections == 1]
    assert len(serving) == 1, "one instance holds the EventSource connection"
    other = gateways[1 - serving[0]]
    await relays[serving[0]].close()  # that instance becomes unreachable for nginx
    await wait_words(page, 40)
    assert other.services.metrics.connections == 1  # the reconnect went to the other instance
    await wait_state(page, "done")
    await page.screenshot(path=str(artifacts / "resumed-through-nginx.png"), full_page=True)
    assert await shown(page) == text  # exactly once, nothing lost, nothing repeated
    assert sum(r.last_user_text == text for r in mock_model.requests) == 1

"""The official `openai` Python SDK, pointed at the gateway, works unchanged (DESIGN.md §1)."""

from __future__ import annotations

import openai
import pytest

KEYS = {"sdk-key": "sdk-user"}


@pytest.fixture
def client(io_loop, start_gateway):
    gateway = start_gateway(api_keys=KEYS, heartbeat_interval=0.2)
    sdk = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="sdk-key", max_retries=0)
    yield sdk
    io_loop.run_sync(sdk.close)


async def collect(stream) -> str:
    text = []
    async for chunk in stream:
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
    return "".join(text)


@pytest.mark.parametrize("text", ["streamed through the SDK", "中文 😀\n\nline\u2028two"])
async def test_sdk_streams(client, text):
    stream = await client.chat.completions.create(
        model="mock-echo", messages=[{"role": "user", "content": text}], stream=True
    )
    assert await collect(stream) == text


async def test_sdk_streams_through_heartbeats(client):
    # Heartbeats and the retry line must not reach the SDK as empty events (JSONDecodeError).
    stream = await client.chat.completions.create(
        model="mock-echo",
        messages=[{"role": "user", "content": "after a long think"}],
        stream=True,
        extra_body={"mock_first_token_delay": 0.7, "mock_token_delay": 0.3},
    )
    assert await collect(stream) == "after a long think"


async def test_sdk_stream_with_usage(client):
    stream = await client.chat.completions.create(
        model="mock-count", messages=[{"role": "user", "content": "count"}], max_tokens=3,
        stream=True, stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "0 1 2 "
    assert chunks[-1].usage.completion_tokens == 3


async def test_sdk_non_streaming(client):
    completion = await client.chat.completions.create(
        model="mock-echo", messages=[{"role": "user", "content": "not streamed"}]
    )
    assert completion.choices[0].message.content == "not streamed"
    assert completion.usage.completion_tokens == 2


async def test_sdk_raises_api_error_on_a_mid_stream_failure(client):
    stream = await client.chat.completions.create(
        model="mock-echo",
        messages=[{"role": "user", "content": "one two three four"}],
        stream=True,
        extra_body={"mock_fail_after": 2},
    )
    received = []
    with pytest.raises(openai.APIError) as raised:
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert received == ["", "one "]
    assert "closed the stream before the answer was complete" in raised.value.message


async def test_sdk_lists_models(client):
    models = await client.models.list()
    assert [m.id for m in models.data] == ["mock-echo", "mock-count"]


@pytest.mark.parametrize(
    ("api_key", "extra", "error"),
    [
        ("wrong-key", {}, openai.AuthenticationError),
        ("sdk-key", {"mock_error_status": 400}, openai.BadRequestError),
        ("sdk-key", {"mock_error_status": 429}, openai.RateLimitError),
        ("sdk-key", {"mock_error_status": 500}, openai.APIStatusError),
    ],
)
async def test_sdk_maps_gateway_errors(start_gateway, api_key, extra, error):
    gateway = start_gateway(api_keys=KEYS)
    async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=api_key, max_retries=0) as client:
        with pytest.raises(error):
            await client.chat.completions.create(
                model="mock-echo", messages=[{"role": "user", "content": "x"}], stream=True, extra_body=extra
            )


async def test_sdk_bad_request_names_the_field(client):
    with pytest.raises(openai.BadRequestError) as raised:
        await client.chat.completions.create(model="mock-echo", messages=[], stream=True)
    assert raised.value.param == "messages"

"""The incremental SSE decoder: WHATWG tables, every split of the input, a real capture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sse_gateway.decoder import DecodeError, LineDecoder, RawEventDecoder, ServerSentEvent, SSEDecoder

SAMPLES = Path(__file__).resolve().parent / "samples"


def decode(data: bytes) -> list[tuple[str, str, str | None]]:
    return [(e.event, e.data, e.id) for e in SSEDecoder().feed(data)]


CASES = [
    # (input, [(event, data, last id)])
    (b"data: a\n\n", [("message", "a", None)]),
    (b"data:a\n\n", [("message", "a", None)]),
    (b"data:  a\n\n", [("message", " a", None)]),  # only one leading space is removed
    (b"data: a\r\n\r\n", [("message", "a", None)]),
    (b"data: a\r\rdata: b\r\r", [("message", "a", None), ("message", "b", None)]),
    (b"data: a\ndata: b\n\n", [("message", "a\nb", None)]),
    (b"data\n\n", [("message", "", None)]),
    (b"data:\n\n", [("message", "", None)]),
    (b"data: \ndata: \n\n", [("message", "\n", None)]),
    (b"event: note\ndata: x\n\n", [("note", "x", None)]),
    (b"event: note\n\ndata: x\n\n", [("message", "x", None)]),  # event type resets on dispatch
    (b"id: 1\ndata: x\n\ndata: y\n\n", [("message", "x", "1"), ("message", "y", "1")]),  # id persists
    (b"id: 1\ndata: x\n\nid\ndata: y\n\n", [("message", "x", "1"), ("message", "y", "")]),
    (b"id: a\0b\ndata: x\n\n", [("message", "x", None)]),  # ids with NUL are ignored
    (b": comment\ndata: x\n\n", [("message", "x", None)]),
    (b":\n\n", []),
    (b"id: 5\n\n", []),  # no data: nothing dispatched
    (b"retry: 10\n\n", []),
    (b"foo: bar\ndata: x\n\n", [("message", "x", None)]),  # unknown fields are ignored
    (b"data: x", []),  # an event cut off by the end of input is dropped
    (b"data: x\n", []),
    (b"\xef\xbb\xbfdata: bom\n\n", [("message", "bom", None)]),  # one leading BOM is dropped
    (b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\n", []),  # a second BOM makes the field name unknown
    (b"data: \xff\n\n", [("message", "\ufffd", None)]),  # invalid UTF-8 -> U+FFFD
    ("data: 中文 😀\n\n".encode(), [("message", "中文 😀", None)]),
    ("data: a\u2028b\x85c\n\n".encode(), [("message", "a\u2028b\x85c", None)]),
    (b"data: a\x0bb\x0cc\n\n", [("message", "a\x0bb\x0cc", None)]),
]


@pytest.mark.parametrize(("data", "expected"), CASES)
def test_table(data, expected):
    assert decode(data) == expected


@pytest.mark.parametrize(("data", "expected"), CASES)
def test_table_split_at_every_offset(data, expected):
    for cut in range(len(data) + 1):
        decoder = SSEDecoder()
        events = decoder.feed(data[:cut]) + decoder.feed(data[cut:])
        assert [(e.event, e.data, e.id) for e in events] == expected, f"split at {cut}"


def test_byte_by_byte():
    data = "\ufeffid: 1\r\nevent: e\r\ndata: 中\r\ndata: 😀\r\n\r\n: c\rdata: z\r\r".encode()
    decoder = SSEDecoder()
    events = [e for i in range(len(data)) for e in decoder.feed(data[i : i + 1])]
    assert events == [ServerSentEvent("中\n😀", "e", "1"), ServerSentEvent("z", "message", "1")]


def test_cr_at_end_of_read_then_lf():
    lines = LineDecoder()
    assert lines.feed(b"a\r") == [b"a"]
    assert lines.feed(b"\nb\r") == [b"b"]
    assert lines.feed(b"\r") == [b""]  # a second CR is a new (empty) line, not the pair of the first
    assert lines.feed(b"\n") == []


def test_long_lines_far_beyond_64_kib():
    payload = "x" * (1024 * 1024)
    data = f"data: {payload}\n\n".encode()
    decoder = SSEDecoder()
    events = []
    for start in range(0, len(data), 4096):
        events += decoder.feed(data[start : start + 4096])
    assert [e.data for e in events] == [payload]


def test_line_over_the_bound_is_an_error():
    decoder = SSEDecoder(max_size=1000)
    with pytest.raises(DecodeError):
        for _ in range(20):
            decoder.feed(b"x" * 100)


def test_event_over_the_bound_is_an_error():
    decoder = SSEDecoder(max_size=1000)
    with pytest.raises(DecodeError):
        decoder.feed(b"data: " + b"x" * 100 + b"\n" * 1)
        for _ in range(20):
            decoder.feed(b"data: " + b"x" * 100 + b"\n")


def test_retry_field():
    decoder = SSEDecoder()
    decoder.feed(b"retry: 1500\n")
    assert decoder.events.retry == 1500
    decoder.feed(b"retry: 15x\nretry: \xd9\xa3\n")  # not all ASCII digits: ignored
    assert decoder.events.retry == 1500


def test_comments_are_reported():
    seen = []
    SSEDecoder(on_comment=seen.append).feed(b": ping\n:x\ndata: y\n\n")
    assert seen == ["ping", "x"]


def test_real_openai_capture_decodes_to_its_ten_events():
    data = (SAMPLES / "openai_chat_stream.sse").read_bytes()
    for cut in range(0, len(data) + 1, 7):
        decoder = SSEDecoder()
        events = decoder.feed(data[:cut]) + decoder.feed(data[cut:])
        assert len(events) == 10
        assert events[-1].data == "[DONE]"
        chunks = [json.loads(e.data) for e in events[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "3 + 5 = 8"


# --- the gateway's own decoder: the same events as the spec's, with the data kept as bytes ------


def relayed(decoder: RawEventDecoder, data: bytes) -> list[tuple[str, str]]:
    return [((e or b"message").decode(), d.decode()) for e, d in decoder.feed(data)]


def reference(data: bytes) -> list[tuple[str, str]]:
    return [(e.event, e.data) for e in SSEDecoder().feed(data)]


@pytest.mark.parametrize(("data", "_expected"), CASES)
def test_the_relay_decoder_agrees_with_the_spec_at_every_split(data, _expected):
    expected = reference(data)
    for cut in range(len(data) + 1):
        decoder = RawEventDecoder()
        assert relayed(decoder, data[:cut]) + relayed(decoder, data[cut:]) == expected, f"split at {cut}"


def test_the_relay_decoder_byte_by_byte():
    data = "\ufeffid: 1\r\nevent: e\r\ndata: 中\r\ndata: 😀\r\n\r\n: c\rdata: z\r\r\n\n\ndata: {\"a\":1}\n\n".encode()
    decoder = RawEventDecoder()
    events = [e for i in range(len(data)) for e in relayed(decoder, data[i : i + 1])]
    assert events == reference(data)


def test_the_relay_decoder_reads_a_real_capture_at_every_seventh_split():
    data = (SAMPLES / "openai_chat_stream.sse").read_bytes()
    expected = reference(data)
    assert len(expected) == 10
    for cut in range(0, len(data) + 1, 7):
        decoder = RawEventDecoder()
        assert relayed(decoder, data[:cut]) + relayed(decoder, data[cut:]) == expected


def test_the_relay_decoder_keeps_a_long_event_whole_and_bounded():
    payload = b"x" * (1024 * 1024)
    decoder = RawEventDecoder()
    events = []
    for start in range(0, len(payload), 4096):
        events += decoder.feed((b"data: " + payload + b"\n\n")[start : start + 4096])
    events += decoder.feed((b"data: " + payload + b"\n\n")[len(payload) // 4096 * 4096 :])
    assert [d for _e, d in events] == [payload]
    bounded = RawEventDecoder(max_size=1000)
    with pytest.raises(DecodeError):
        for _ in range(20):
            bounded.feed(b"data: " + b"x" * 100)


def test_the_relay_decoder_keeps_data_bytes_as_sent():
    data = 'data: {"content":"😀 \\u00e9"}\n\n'.encode()
    assert RawEventDecoder().feed(data) == [(None, 'data: {"content":"😀 \\u00e9"}'.encode()[6:])]

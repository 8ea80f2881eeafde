"""The SSE encoder, byte for byte."""

from __future__ import annotations

import pytest

from sse_gateway.decoder import SSEDecoder
from sse_gateway.frames import PING, FrameError, encode_comment, encode_event, encode_retry


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"data": "hello"}, b"data: hello\n\n"),
        ({"data": b'{"a":1}'}, b'data: {"a":1}\n\n'),
        ({"data": ""}, b"data: \n\n"),
        ({"data": "x", "id": "s:1"}, b"id: s:1\ndata: x\n\n"),
        ({"data": "x", "id": ""}, b"id: \ndata: x\n\n"),
        ({"data": "x", "event": "note"}, b"event: note\ndata: x\n\n"),
        ({"data": "x", "event": "message"}, b"data: x\n\n"),
        ({"data": "x", "id": "7", "event": "note"}, b"id: 7\nevent: note\ndata: x\n\n"),
        ({"data": "a\nb"}, b"data: a\ndata: b\n\n"),
        ({"data": "a\r\nb"}, b"data: a\ndata: b\n\n"),
        ({"data": "a\rb"}, b"data: a\ndata: b\n\n"),
        ({"data": "a\n\nb"}, b"data: a\ndata: \ndata: b\n\n"),
        ({"data": "a\n"}, b"data: a\ndata: \n\n"),
        ({"data": "\r\n"}, b"data: \ndata: \n\n"),
        ({"data": b"a\r\n\rb"}, b"data: a\ndata: \ndata: b\n\n"),
        # U+2028, U+2029, U+0085, VT and FF are not SSE line ends: they stay inside the line.
        ({"data": "a\u2028b\u2029c\x85d\x0be\x0cf"}, "data: a\u2028b\u2029c\x85d\x0be\x0cf\n\n".encode()),
        ({"data": "中文 😀"}, "data: 中文 😀\n\n".encode()),
        ({"data": ": not a comment"}, b"data: : not a comment\n\n"),
    ],
)
def test_encode_event(kwargs, expected):
    assert encode_event(**kwargs) == expected


@pytest.mark.parametrize("text", ["a\nb", "a\r\nb\rc\n", "\n\n", "x\u2028y", "😀\r\n中", "", " leading space"])
def test_encoded_data_decodes_to_itself(text):
    # What a browser reads back is the text given, with CRLF and CR turned into LF.
    events = SSEDecoder().feed(encode_event(text, id="1"))
    assert [e.data for e in events] == [text.replace("\r\n", "\n").replace("\r", "\n")]


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\r\nb", "\n", "a\0b"])
@pytest.mark.parametrize("field", ["id", "event"])
def test_line_breaks_in_id_or_event_are_rejected(field, bad):
    with pytest.raises(FrameError):
        encode_event("x", **{field: bad})


def test_injection_through_id_is_impossible():
    # If this were written, a reader would see a second, forged event.
    with pytest.raises(FrameError):
        encode_event("x", id="1\n\ndata: forged")


def test_empty_event_name_is_rejected():
    with pytest.raises(FrameError):
        encode_event("x", event="")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("ping", b": ping\n"), ("", b": \n"), ("a\nb", b": a\n: b\n"), ("a\r\nb", b": a\n: b\n")],
)
def test_encode_comment(text, expected):
    assert encode_comment(text) == expected


def test_ping_is_a_single_comment_line_without_blank_line():
    assert PING == encode_comment("ping") == b": ping\n"


@pytest.mark.parametrize(("ms", "expected"), [(0, b"retry: 0\n"), (3000, b"retry: 3000\n")])
def test_encode_retry(ms, expected):
    assert encode_retry(ms) == expected


@pytest.mark.parametrize("bad", [-1, 1.5, "3000", True, None])
def test_encode_retry_rejects_non_integers(bad):
    with pytest.raises(FrameError):
        encode_retry(bad)


def test_retry_and_ping_ride_ahead_of_the_next_event():
    # No blank line after them: the block they are in is dispatched only with real data.
    stream = encode_retry(3000) + PING + PING + encode_event("x", id="s:1")
    decoder = SSEDecoder()
    assert [(e.data, e.id) for e in decoder.feed(stream)] == [("x", "s:1")]
    assert decoder.events.retry == 3000

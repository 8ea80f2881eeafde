"""The mock model's Responses API (`POST /v1/responses`, DESIGN.md §4.6): one answer as a
`response` object, or as its typed event stream, in the order OpenAI sends them.

`mock-echo` answers the `input` (a string, or the last user message's text) one word per
`response.output_text.delta`; with `tools`, it calls the first function tool instead, its
arguments `{"text": <input>}` streamed in pieces of a few characters. `mock-count` writes
`max_output_tokens` words "0 ", "1 ", …. Every event carries `type` and `sequence_number`.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator, Sequence
from typing import Any

import orjson

ARGUMENT_PIECE = 7  # characters of function-call arguments per delta


def input_text(body: dict[str, Any]) -> str:
    """The text the mock answers: `input` as a string, or the last user message's text."""
    value = body.get("input")
    if isinstance(value, str):
        return value
    for item in reversed(value if isinstance(value, list) else []):
        if not isinstance(item, dict) or item.get("role", "user") != "user":
            continue
        content = item.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "".join(p.get("text", "") for p in content
                           if isinstance(p, dict) and p.get("type") in ("input_text", "text") and isinstance(p.get("text"), str))
    return ""


def _function_tool(body: dict[str, Any]) -> dict[str, Any] | None:
    for tool in body.get("tools") or []:
        if isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("name"), str):
            return tool
    return None


class ResponseAnswer:
    """One Responses API answer of the mock model."""

    def __init__(self, model: str, pieces: Sequence[str], body: dict[str, Any], prompt_tokens: int) -> None:
        self.model = model
        self.pieces = pieces
        self.tool = _function_tool(body)
        self.id = "resp_mock" + secrets.token_hex(12)
        self.item_id = ("fc_mock" if self.tool else "msg_mock") + secrets.token_hex(12)
        self.call_id = "call_mock" + secrets.token_hex(8)
        self.created = int(time.time())
        self.text = input_text(body)
        self.body = body
        self.prompt_tokens = prompt_tokens
        self._seq = -1

    def _arguments(self) -> str:
        return orjson.dumps({"text": self.text}).decode()

    def _item(self, done: bool) -> dict[str, Any]:
        status = "completed" if done else "in_progress"
        if self.tool is not None:
            return {"id": self.item_id, "type": "function_call", "status": status, "call_id": self.call_id,
                    "name": self.tool["name"], "arguments": self._arguments() if done else ""}
        content = [{"type": "output_text", "text": "".join(self.pieces), "annotations": [], "logprobs": []}] if done else []
        return {"id": self.item_id, "type": "message", "status": status, "role": "assistant", "content": content}

    def _usage(self) -> dict[str, Any]:
        output = len(self.pieces) if self.tool is None else max(1, len(self._arguments()) // 4)
        return {"input_tokens": self.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.prompt_tokens + output}

    def response(self, status: str) -> dict[str, Any]:
        done = status == "completed"
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "model": self.model, "output": [self._item(True)] if done else [],
            "usage": self._usage() if done else None, "error": None, "incomplete_details": None,
            "instructions": self.body.get("instructions"), "metadata": self.body.get("metadata") or {},
            "parallel_tool_calls": True, "temperature": 1.0, "top_p": 1.0, "tool_choice": "auto",
            "tools": self.body.get("tools") or [], "text": {"format": {"type": "text"}},
            "previous_response_id": self.body.get("previous_response_id"),
        }

    def completed(self) -> bytes:
        return orjson.dumps(self.response("completed"))

    def _event(self, kind: str, **fields: Any) -> bytes:
        self._seq += 1
        data = orjson.dumps({"type": kind, "sequence_number": self._seq, **fields})
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    def frames(self) -> Iterator[bytes]:
        """The events of the stream, each made when it is due."""
        yield self._event("response.created", response=self.response("in_progress"))
        yield self._event("response.in_progress", response=self.response("in_progress"))
        where = {"item_id": self.item_id, "output_index": 0}
        yield self._event("response.output_item.added", output_index=0, item=self._item(False))
        if self.tool is not None:
            arguments = self._arguments()
            for start in range(0, len(arguments), ARGUMENT_PIECE):
                yield self._event("response.function_call_arguments.delta", **where, delta=arguments[start:start + ARGUMENT_PIECE])
            yield self._event("response.function_call_arguments.done", **where, name=self.tool["name"], arguments=arguments)
        else:
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            yield self._event("response.content_part.added", **where, content_index=0, part=part)
            for piece in self.pieces:
                yield self._event("response.output_text.delta", **where, content_index=0, delta=piece, logprobs=[])
            text = "".join(self.pieces)
            yield self._event("response.output_text.done", **where, content_index=0, text=text, logprobs=[])
            yield self._event("response.content_part.done", **where, content_index=0, part={**part, "text": text})
        yield self._event("response.output_item.done", output_index=0, item=self._item(True))
        yield self._event("response.completed", response=self.response("completed"))

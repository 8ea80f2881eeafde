"""Credentials a browser can use where it cannot send a key, and idempotent starts (DESIGN.md §4.2).

- Read tickets: `EventSource` can only GET a URL, so `POST /v1/streams` returns one with a
  random token in it. The token is stored with its stream and user and expires after
  `ticket_ttl`; it reads that one stream and nothing else, and can be used again until it
  expires, because the browser's automatic reconnect sends the same URL.
- Sessions: `POST /v1/session` trades a key for a random session id in a signed, HttpOnly
  cookie; the id is stored with its user and expires after `session_ttl`, and ending the session
  deletes it, so a copied cookie stops working too.
- Idempotency keys: a POST repeated with the same `Idempotency-Key` by the same user (a retrying
  fetch client, a tab that comes back) attaches to the stream the first one started.
- Response owners: which user a Responses API answer (by its id) belongs to.

Tokens and ids are 192-bit random values from `secrets`; only their SHA-256 is used as a store
key, so that a store dump does not hand out working credentials.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

import orjson

from .errors import GatewayError, bad_request
from .store import Keys

__all__ = ["IdempotencyKeys", "ReadTickets", "ResponseOwners", "Sessions", "Ticket"]

_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


def _hashed(kind: str, secret: str) -> str:
    return f"{kind}:{hashlib.sha256(secret.encode()).hexdigest()}"


class Ticket:
    __slots__ = ("stream_id", "user")

    def __init__(self, stream_id: str, user: str) -> None:
        self.stream_id = stream_id
        self.user = user


class ReadTickets:
    def __init__(self, keys: Keys, ttl: float) -> None:
        self._keys = keys
        self.ttl = ttl

    async def issue(self, stream_id: str, user: str) -> str:
        token = secrets.token_urlsafe(24)
        await self._keys.put(_hashed("ticket", token), orjson.dumps([stream_id, user]), self.ttl)
        return token

    async def check(self, token: str) -> Ticket | None:
        """The ticket behind `token`, or None when it is forged or expired."""
        if not token or len(token) > 128:
            return None
        value = await self._keys.get(_hashed("ticket", token))
        if value is None:
            return None
        stream_id, user = orjson.loads(value)
        return Ticket(stream_id, user)


class Sessions:
    def __init__(self, keys: Keys, ttl: float) -> None:
        self._keys = keys
        self.ttl = ttl

    async def create(self, user: str) -> str:
        session_id = secrets.token_urlsafe(24)
        await self._keys.put(_hashed("session", session_id), user.encode(), self.ttl)
        return session_id

    async def user(self, session_id: str) -> str | None:
        value = await self._keys.get(_hashed("session", session_id))
        return value.decode() if value is not None else None

    async def end(self, session_id: str) -> None:
        await self._keys.delete(_hashed("session", session_id))


def check_idempotency_key(value: str) -> str:
    if not _IDEMPOTENCY_KEY.fullmatch(value):
        raise bad_request(
            "Idempotency-Key must be 1 to 255 printable ASCII characters without spaces.",
            param="Idempotency-Key", code="invalid_idempotency_key",
        )
    return value


class IdempotencyKeys:
    """(user, key) -> the stream a first request started, with a fingerprint of its body."""

    def __init__(self, keys: Keys, ttl: float) -> None:
        self._keys = keys
        self.ttl = ttl

    @staticmethod
    def _key(user: str, key: str) -> str:
        return _hashed("idempotency", f"{user}\0{key}")

    async def claim(self, user: str, key: str, fingerprint: str, stream_id: str) -> str | None:
        """Record `stream_id` for the key; if an earlier request holds it, return its stream id.

        A key reused with a different body is a client bug that would silently return the
        wrong answer: 409.
        """
        value = orjson.dumps([stream_id, fingerprint])
        existing = await self._keys.put(self._key(user, key), value, self.ttl, only_if_absent=True)
        if existing is None:
            return None
        earlier_stream, earlier_fingerprint = orjson.loads(existing)
        if earlier_fingerprint != fingerprint:
            raise GatewayError(
                409, "This Idempotency-Key was already used with a different request body.",
                code="idempotency_key_reused",
            )
        return str(earlier_stream)

    async def release(self, user: str, key: str) -> None:
        """Forget the key (its stream is gone), so that the next request starts afresh."""
        await self._keys.delete(self._key(user, key))


def fingerprint(payload: dict[str, object]) -> str:
    """The same request, however its JSON was spaced or ordered."""
    return hashlib.sha256(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)).hexdigest()


class ResponseOwners:
    """Which user each Responses API answer belongs to (by its id), for as long as an upstream
    keeps it (OpenAI: 30 days): every user shares the gateway's upstream key, so without this
    record `GET /v1/responses/<id>`, its cancel, and `previous_response_id` would reach any
    user's answers. Only the hash of the id is stored, and the owner's name."""

    def __init__(self, keys: Keys, ttl: float) -> None:
        self._keys = keys
        self.ttl = ttl

    async def remember(self, user: str, response_id: str) -> None:
        await self._keys.put(_hashed("response", response_id), user.encode(), self.ttl)

    async def check(self, user: str, response_id: str, param: str | None = None) -> None:
        """404 (or a 400 naming `param`, for a request that refers to it) unless `user` owns it:
        an answer of another user is not told apart from one that does not exist."""
        owner = await self._keys.get(_hashed("response", response_id))
        if owner is None or not hmac.compare_digest(owner, user.encode()):
            if param is not None:
                raise bad_request(f"No response with id '{response_id[:64]}' of yours.", param=param,
                                  code="response_not_found")
            raise GatewayError(404, "No response with this id; it may have expired.", code="response_not_found")


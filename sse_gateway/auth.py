"""Client authentication by Bearer API key (DESIGN.md §4.4).

Keys are looked up by their SHA-256 digest, then confirmed with `hmac.compare_digest`, so the
time a lookup takes says nothing useful about how close a guess was. With no keys configured
the gateway runs in open dev mode: every caller is the user `anonymous`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from .errors import GatewayError

__all__ = ["ANONYMOUS", "ApiKeys"]

ANONYMOUS = "anonymous"


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def unauthorized(message: str, code: str) -> GatewayError:
    return GatewayError(401, message, type="invalid_request_error", code=code)


class ApiKeys:
    def __init__(self, keys: Mapping[str, str]) -> None:
        self._by_digest = {_digest(key.encode()): (key.encode(), user) for key, user in keys.items()}

    @property
    def open(self) -> bool:
        """True in open dev mode (no keys configured)."""
        return not self._by_digest

    def lookup(self, key: str) -> str | None:
        """The user a key belongs to, or None."""
        presented = key.encode()
        entry = self._by_digest.get(_digest(presented))
        if entry is None or not hmac.compare_digest(entry[0], presented):
            return None
        return entry[1]

    def authenticate(self, authorization: str | None) -> str:
        """The user behind an `Authorization: Bearer <key>` header, or a 401 GatewayError."""
        if self.open:
            return ANONYMOUS
        if not authorization:
            raise unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.", "missing_api_key"
            )
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise unauthorized("Send the API key as 'Authorization: Bearer <key>'.", "invalid_authorization")
        user = self.lookup(token)
        if user is None:
            raise unauthorized("Incorrect API key provided.", "invalid_api_key")
        return user

"""`POST /v1/session` trades a key for a session cookie; `GET /v1/session` says whose it is;
`DELETE /v1/session` ends it (DESIGN.md §4.4).

For `EventSource`, which cannot send an Authorization header: the cookie is HttpOnly (no script
can read it), signed, `SameSite=Lax` (not sent with cross-site POSTs), and `Secure` when the
request came over HTTPS.
"""

from __future__ import annotations

import orjson

from sse_gateway.auth import unauthorized

from .base import SESSION_COOKIE, ApiHandler


class SessionHandler(ApiHandler):
    cookie_methods = frozenset()  # a session is made from a key, never from another session
    # Ending a session needs no more than its cookie; asking whose it is, not even that (401).
    public_methods = frozenset({"GET", "DELETE"})

    async def get(self) -> None:
        """`{"user": …}` of the session cookie, so that a reloaded page shows who is signed in
        (the cookie is HttpOnly: no script can read it); 401 without a live session, open dev
        mode included (nobody signed in there)."""
        session_id = self.session_id()
        if session_id is None:
            raise unauthorized("Not signed in.", "no_session")
        user = await self.services.sessions.user(session_id)
        if user is None:
            raise unauthorized("The session has ended; sign in again.", "session_expired")
        self.user = user
        body = {"object": "session", "user": user}
        self.set_header("Cache-Control", "no-store")
        self.write_json(orjson.dumps(body))

    async def post(self) -> None:
        sessions = self.services.sessions
        session_id = await sessions.create(self.user)
        self.set_signed_cookie(
            SESSION_COOKIE, session_id, expires_days=None, max_age=int(sessions.ttl),
            httponly=True, samesite="Lax", secure=self.request.protocol == "https", path="/",
        )
        body = {"object": "session", "user": self.user, "expires_in": int(sessions.ttl)}
        self.write_json(orjson.dumps(body))

    async def delete(self) -> None:
        session_id = self.session_id()
        if session_id is not None:
            await self.services.sessions.end(session_id)
        self.clear_cookie(SESSION_COOKIE, path="/")
        self.set_status(204)

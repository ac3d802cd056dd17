"""What WebSocket clients can hold, across their sockets: stream slots per client, and the open sessions, which a
shutdown drains (server/shutdown.py).

A client is the peer address uvicorn puts in the ASGI scope: behind a proxy that uvicorn trusts
(--forwarded-allow-ips, loopback by default) the address its X-Forwarded-For names, so that one client behind the
documented reverse proxy is counted as one client, not as the proxy.
"""

from __future__ import annotations

import asyncio
import collections
import time


def client_address(ws) -> str:
    """The client a WebSocket (or request) counts for: the peer address in its ASGI scope (see above)."""
    return ws.client.host if ws.client else "unknown"


class ClientStreams:
    """Stream slots (held or waited for) per client, at most `limit` each."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held: collections.Counter[str] = collections.Counter()

    def acquire(self, client: str) -> bool:
        if self.held[client] >= self.limit:
            return False
        self.held[client] += 1
        return True

    def release(self, client: str) -> None:
        self.held[client] -= 1
        if self.held[client] <= 0:
            del self.held[client]


class SessionRegistry:
    """The open WebSocket sessions; `drain` lets their contexts finish, then cuts the rest (each session's
    `draining`, `contexts` and `cut_contexts()`)."""

    def __init__(self):
        self.sessions: set = set()

    def add(self, session) -> None:
        self.sessions.add(session)

    def discard(self, session) -> None:
        self.sessions.discard(session)

    def busy(self) -> bool:
        return any(session.contexts for session in self.sessions)

    async def drain(self, grace_s: float, *, poll_s: float = 0.05, cut_wait_s: float = 2.0) -> None:
        """No new contexts; the open ones get `grace_s` to finish, then an `error` and their `audio_done`
        (cut_wait_s: how long their last events may take to go out)."""
        for session in list(self.sessions):
            session.draining = True
        deadline = time.monotonic() + grace_s
        while self.busy() and time.monotonic() < deadline:
            await asyncio.sleep(poll_s)
        for session in list(self.sessions):
            await session.cut_contexts(grace_s)
        deadline = time.monotonic() + cut_wait_s
        while self.busy() and time.monotonic() < deadline:
            await asyncio.sleep(poll_s)

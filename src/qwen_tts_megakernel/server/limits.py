"""Connection-level limits, from a request's first byte to the end of its body, on every route.

    LimitedHttpProtocol  uvicorn's httptools protocol with deadlines and sizes (uvicorn has none of these):
                         headers must arrive within header_timeout_s (else the connection is closed) and within
                         max_header_bytes, request line included (431); a body must arrive within its deadline,
                         body_timeout_s (upload_timeout_s for voice uploads), also when the app never reads it
                         (408). A response that goes out before its request's body ended closes the connection
                         (after LINGER_S): an unread body is not drained for ever.
    RequestLimits        ASGI middleware: a request with two Host headers is refused (400), and a body is counted as
                         it arrives, so that one without Content-Length (chunked) is refused at its route's cap (413)
                         before more of it is read or spooled.

A refusal is written in the API's JSON error shape with `Connection: close`; the server then stops sending, keeps
discarding what the client still sends for at most LINGER_S (closing a socket with unread data resets it, and the
client could lose the answer) and closes.
"""

from __future__ import annotations

import json
import logging

from .protocol import ServerSettings

log = logging.getLogger("qwen_tts_megakernel.server")

LINGER_S = 1.0
REASONS = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large",
           431: "Request Header Fields Too Large"}


def error_body(message: str, status: int) -> bytes:
    code = {408: "timeout", 413: "too_large", 431: "headers_too_large"}.get(status)
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()


def refusal_response(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    body = error_body(message, status)
    return (f"HTTP/1.1 {status} {REASONS[status]}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


def limited_http_protocol(settings: ServerSettings, body_deadlines: dict[str, float]):
    """The protocol class for uvicorn's `http` setting, or "auto" (uvicorn's h11, without the body deadline and with
    its own header limit) when httptools is missing. `body_deadlines`: path -> seconds for routes whose bodies may
    take longer than body_timeout_s (uploads)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "auto"

    header_timeout_s, max_header_bytes = settings.header_timeout_s, settings.max_header_bytes

    class LimitedHttpProtocol(HttpToolsProtocol):
        header_timer = None
        body_timer = None
        linger_timer = None
        refused = False
        awaiting_headers = True  # between messages or inside a request line / headers
        header_bytes = 0

        # Headers: time and size ---------------------------------------------------------------------------------

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.arm_header_timer()

        def data_received(self, data: bytes) -> None:
            if self.refused:
                return  # the answer went out: what the client still sends is discarded until the linger ends
            if self.awaiting_headers:
                self.header_bytes += len(data)
            super().data_received(data)
            if self.awaiting_headers and self.header_bytes > max_header_bytes and not self.refused:
                self.refuse(431, f"the request line and headers are larger than {max_header_bytes} bytes")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.arm_header_timer()

        def on_headers_complete(self) -> None:
            self.awaiting_headers = False
            self.cancel("header_timer")
            super().on_headers_complete()
            if not self.parser.should_upgrade() and not self.refused:
                deadline = body_deadlines.get(self.scope.get("path"), settings.body_timeout_s)
                self.body_timer = self.loop.call_later(deadline, self.body_too_slow, deadline)

        def on_message_complete(self) -> None:
            self.cancel("body_timer")
            self.awaiting_headers, self.header_bytes = True, 0
            super().on_message_complete()

        def arm_header_timer(self) -> None:
            if self.header_timer is None:
                self.header_timer = self.loop.call_later(header_timeout_s, self.headers_too_slow)

        def headers_too_slow(self) -> None:
            self.header_timer = None
            self.logger.info("closed a connection whose request headers took more than %g s", header_timeout_s)
            self.transport.close()

        # Bodies --------------------------------------------------------------------------------------------------

        def body_too_slow(self, deadline: float) -> None:
            self.body_timer = None
            cycle = self.cycle
            if cycle is not None and not cycle.response_started:
                self.refuse(408, f"the request body did not arrive within {deadline:g} s")
            else:  # answered already, and the rest of the body would only be drained: stop
                self.logger.info("closed a connection whose request body took more than %g s", deadline)
                self.transport.close()

        def on_response_complete(self) -> None:
            # The latest request was answered before its body ended (not a pipelined one before it): not drained.
            if self.body_timer is not None and not self.refused and self.cycle.response_complete:
                self.cancel("body_timer")
                self.stop_and_linger()
                return
            super().on_response_complete()

        # Refusals ------------------------------------------------------------------------------------------------

        def refuse(self, status: int, message: str) -> None:
            """Answer `status` and close: the request's app (if any) is told the client left."""
            log.warning("refused a connection: %s", message)
            self.refused = True
            self.cancel("header_timer")
            self.cancel("body_timer")
            self._unset_keepalive_if_required()
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
            self.transport.write(refusal_response(status, message))
            self.stop_and_linger()

        def stop_and_linger(self) -> None:
            """Send nothing more, discard what comes for at most LINGER_S, close."""
            self.refused = True
            if self.transport.is_closing():
                return
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.linger_timer = self.loop.call_later(LINGER_S, self.transport.close)

        def cancel(self, name: str) -> None:
            timer = getattr(self, name)
            if timer is not None:
                timer.cancel()
                setattr(self, name, None)

        def handle_websocket_upgrade(self) -> None:
            for name in ("header_timer", "body_timer"):
                self.cancel(name)
            super().handle_websocket_upgrade()

        def connection_lost(self, exc) -> None:
            for name in ("header_timer", "body_timer", "linger_timer"):
                self.cancel(name)
            super().connection_lost(exc)

    return LimitedHttpProtocol


class RequestLimits:
    """ASGI middleware: duplicate Host headers (400), and bodies counted as they arrive against their route's cap
    (`caps`: path -> bytes, else `default_cap`): past it the client gets 413 and the app sees a disconnected client
    (what it answers is dropped)."""

    def __init__(self, app, default_cap: int, caps: dict[str, int]):
        self.app = app
        self.default_cap, self.caps = default_cap, caps

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        hosts = sum(1 for name, _ in scope["headers"] if name == b"host")
        if hosts > 1:
            return await self.refuse_duplicate_host(scope, send, hosts)
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        await self.limited(scope, receive, send)

    async def refuse_duplicate_host(self, scope, send, count: int) -> None:
        message = f"the request has {count} Host headers; send exactly one"
        log.warning("refused a request: %s", message)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": message})
            return
        await send_error(send, 400, message, close=True)

    async def limited(self, scope, receive, send) -> None:
        from starlette.requests import ClientDisconnect

        cap = self.caps.get(scope["path"], self.default_cap)
        state = {"received": 0, "refused": False, "started": False}

        async def counted_receive():
            if state["refused"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > cap:
                    state["refused"] = True
                    if not state["started"]:
                        state["started"] = True
                        await send_error(send, 413, f"the request body is larger than {cap} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if state["refused"]:
                return  # the 413 went out: the app's own answer is dropped
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except ClientDisconnect:  # refused here, timed out by the protocol or gone: nobody to answer
            pass


async def send_error(send, status: int, message: str, *, close: bool = False) -> None:
    """An error response; a refused body's connection is closed by the protocol (after LINGER_S), so that the
    client, still sending, reads the answer instead of a reset."""
    body = error_body(message, status)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status,
                "headers": headers + ([(b"connection", b"close")] if close else [])})
    await send({"type": "http.response.body", "body": body})

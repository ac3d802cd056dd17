"""Graceful shutdown: on SIGTERM (or Ctrl-C) the server stops accepting connections, lets every WebSocket context
finish within shutdown_grace_s, cuts the rest with an `error` and their `audio_done`, and only then lets uvicorn
close the sockets (1012) and wait for the HTTP streams, which finish."""

from __future__ import annotations

import uvicorn


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, sessions, grace_s: float):
        super().__init__(config)
        self.sessions, self.grace_s = sessions, grace_s

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:  # no new connections while the contexts drain
            server.close()
        for sock in sockets or []:
            sock.close()
        await self.sessions.drain(self.grace_s)
        await super().shutdown(sockets)


def draining_server(app, config: uvicorn.Config) -> DrainingServer:
    """The server for an app made by create_app (its WebSocket sessions and shutdown_grace_s)."""
    return DrainingServer(config, app.state.ws_sessions, app.state.settings.shutdown_grace_s)

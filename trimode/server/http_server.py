"""uvicorn, run the way a server facing real clients needs it run.

- Connections are bounded at accept: past `max_connections` a newcomer gets a bare 503 and is
  closed, so a few thousand idle or slow clients cannot exhaust file descriptors.
- A client must send its whole request, head and body, within `read_timeout` seconds of connecting
  (or of its previous response), else the connection is closed: byte-per-second clients do not hold
  slots. Responses (long streams) are not limited, whether the connection is kept alive or not.
- SIGTERM / SIGINT drains: no new connections or requests; running requests get `shutdown_timeout`
  seconds, then end with an error event (streams) or a 503; a second signal exits at once. Either
  way the process exits 0 (uvicorn's own handler would end it by the signal it caught).
- "serving on" is printed once the port is bound, with the port actually bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import sys
from collections.abc import Callable, Iterator
from types import FrameType

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from trimode.server.async_engine import AsyncEngine

FLUSH_S = 2.0  # after the drain deadline, how long the error events get to reach their clients


def bounded_protocol(max_connections: int, read_timeout: float) -> type[H11Protocol]:
    class BoundedH11Protocol(H11Protocol):
        _read_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                transport.close()
                return
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
            self._read_timer = self.loop.call_later(read_timeout, self._read_timed_out)

        def _read_timed_out(self) -> None:
            # h11's view of the client: IDLE until its request's head is in, SEND_BODY until its body
            # is. Once the request is in it is DONE, or MUST_CLOSE (HTTP/1.0, `Connection: close`):
            # from then on the answer may take as long as it takes.
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
                self.transport.close()

    return BoundedH11Protocol


class Server(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        on_first_signal: Callable[[], None],
        on_bound: Callable[[int], None],
        on_stopped: Callable[[], None],
    ) -> None:
        super().__init__(config)
        self.on_first_signal, self.on_bound, self.on_stopped = on_first_signal, on_bound, on_stopped

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # `on_stopped` releases what outlives the app (the engine thread, tensor-parallel workers)
        # however the server stopped.
        with super().capture_signals():
            try:
                yield
            finally:
                self.on_stopped()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not uvicorn's, which records the signal to raise it again once shut down: the process
        # would then end by it (exit status -15, and no exit handlers). A server that drained as
        # asked has stopped cleanly, and exits 0.
        if self.should_exit:
            self.force_exit = True  # a second signal, of any kind: stop waiting
        else:
            self.on_first_signal()
        self.should_exit = True

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.servers:
            self.on_bound(self.servers[0].sockets[0].getsockname()[1])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    app: FastAPI,
    engine: AsyncEngine,
    host: str,
    port: int,
    banner: str,
    shutdown_timeout: float,
    max_connections: int,
    read_timeout: float,
    has_api_key: bool,
    on_stopped: Callable[[], None],
) -> None:
    """Run `app` until a signal, then drain `engine` (see the module docstring); `on_stopped` runs
    once the server has stopped, however it stopped."""
    if not is_loopback(host) and not has_api_key:
        print(
            f"WARNING: serving on {host}, which is not a loopback address, with no API key: anyone who can "
            "reach it can use this server. Set TRIMODE_API_KEY or --api-key-file.",
            file=sys.stderr,
            flush=True,
        )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        http=bounded_protocol(max_connections, read_timeout),
        timeout_graceful_shutdown=shutdown_timeout + FLUSH_S,  # type: ignore[arg-type]  # seconds; a float works
    )
    server = Server(
        config,
        on_first_signal=lambda: engine.drain(shutdown_timeout),
        on_bound=lambda bound: print(banner.format(port=bound), flush=True),
        on_stopped=on_stopped,
    )
    server.run()

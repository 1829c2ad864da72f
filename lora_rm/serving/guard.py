"""What keeps `lora-rm serve` answering while clients misbehave: deadlines for a request's headers and body, a cap
on open connections (fast 503s past it), a bounded drain on SIGTERM, log lines that are throttled and carry no
traceback per event, and a listening socket on a checked port. Built on uvicorn's own HTTP protocol and server
classes: uvicorn times out idle keep-alive connections, but not headers or bodies, and its `limit_concurrency`
acts only once a request's headers are in."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from lora_rm.errors import UserError

log = logging.getLogger("lora_rm.serving.server")


def fd_limit() -> int | None:
    """The process's open-file limit (`ulimit -n`), None where the system has no such number (Windows)."""
    sysconf = getattr(os, "sysconf", None)
    try:
        limit = sysconf("SC_OPEN_MAX") if sysconf else -1
    except (ValueError, OSError):
        return None
    return limit if limit > 0 else None


@dataclass(frozen=True)
class Guards:
    """How long a client may take and how many may connect; `token`, when set, is required of every POST."""

    header_timeout: float = 10.0  # seconds from a connection (or the last response) to complete headers
    body_timeout: float = 60.0  # seconds from the headers to the end of the body
    keep_alive_timeout: int = 5  # seconds an idle kept-alive connection stays open (uvicorn's own timer)
    drain_timeout: float = 30.0  # seconds SIGTERM waits for requests in flight before cutting them
    max_connections: int | None = None  # more are answered 503 (None: 1000, or the fd limit - 64)
    token: str | None = None

    def __post_init__(self) -> None:
        limit = fd_limit()
        if self.max_connections is None:
            object.__setattr__(self, "max_connections", min(1000, limit - 64) if limit else 1000)
        for name in (
            "header_timeout",
            "body_timeout",
            "keep_alive_timeout",
            "drain_timeout",
            "max_connections",
        ):
            if not getattr(self, name) > 0:
                raise UserError(f"--{name.replace('_', '-')}: must be > 0, got {getattr(self, name)}")
        if limit is not None and self.max_connections > limit - 64:
            raise UserError(
                f"--max-connections {self.max_connections}: must stay below the open-file limit {limit} "
                f"(at most {limit - 64}: the model's files and the server need some); raise `ulimit -n` or lower it"
            )
        if self.token is not None and not self.token.strip():
            raise UserError("--token: empty")


class ThrottledLog:
    """One warning line per event, at most `burst` lines per `key` in `window` seconds; the rest are counted and
    the count is logged with the next line of that key after the window (or by `flush`)."""

    def __init__(self, logger: logging.Logger = log, burst: int = 5, window: float = 10.0):
        self.logger, self.burst, self.window = logger, burst, window
        self._seen: dict[str, list[float]] = {}  # key: [window start, lines logged, lines held back]

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        seen = self._seen.get(key)
        if seen is None or now - seen[0] >= self.window:
            if seen and seen[2]:
                self.logger.warning(f"({int(seen[2])} more {key} events in {self.window:.0f} s not logged)")
            seen = self._seen[key] = [now, 0, 0]
        if seen[1] < self.burst:
            seen[1] += 1
            return True
        seen[2] += 1
        return False

    def __call__(self, key: str, message: str) -> None:
        if self.allow(key):
            self.logger.warning(message)

    def flush(self) -> None:
        for key, seen in self._seen.items():
            if seen[2]:
                self.logger.warning(f"({int(seen[2])} more {key} events not logged)")
        self._seen.clear()


class OneLineFilter(logging.Filter):
    """For uvicorn's and asyncio's loggers: a traceback only the first time an exception type is met, one
    line after that, and repeated messages throttled."""

    def __init__(self, throttle: ThrottledLog):
        super().__init__()
        self.throttle, self.tracebacks = throttle, set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.throttle.allow(f"{record.name}: {record.msg}"):
            return False
        if record.exc_info and record.exc_info[0]:
            kind = record.exc_info[0]
            if kind in self.tracebacks:
                record.msg = f"{record.getMessage()} ({kind.__name__}: {record.exc_info[1]})"
                record.args, record.exc_info, record.exc_text = (), None, None
            self.tracebacks.add(kind)
        return True


def quiet_event_loop(throttle: ThrottledLog) -> None:
    """Errors the event loop reports itself (an accept() out of file descriptors, a reset socket) as throttled
    lines without tracebacks."""

    def report(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        throttle(
            "event-loop", f"{context.get('message', 'event loop error')}" + (f": {error!r}" if error else "")
        )

    asyncio.get_running_loop().set_exception_handler(report)


BUSY = b'{"error": "too many open connections; try again shortly"}'


def protocol_class(guards: Guards, throttle: ThrottledLog) -> type:
    """uvicorn's h11 protocol with deadlines: headers within `header_timeout` of the connection (or of the end of
    the previous response), the body within `body_timeout` of the headers; a connection past
    `max_connections` is answered 503 and closed before anything is read."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedProtocol(H11Protocol):
        _timer: asyncio.TimerHandle | None = None
        _phase = ""
        _refused = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > guards.max_connections:
                self._refused = True
                head = "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                head += f"content-length: {len(BUSY)}\r\nconnection: close\r\nretry-after: 1\r\n\r\n"
                transport.write(head.encode() + BUSY)
                transport.close()
                throttle(
                    "busy", f"refused a connection: 503, --max-connections {guards.max_connections} open"
                )
                return
            self._arm("headers", guards.header_timeout)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self._timer is None and self.conn.their_state is h11.IDLE:  # a kept-alive one's next request
                self._arm("headers", guards.header_timeout)
            super().data_received(data)
            state = self.conn.their_state
            if state is h11.SEND_BODY and self._phase == "headers":
                self._arm("body", guards.body_timeout)
            elif state not in (h11.IDLE, h11.SEND_BODY):
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self, phase: str, seconds: float) -> None:
            self._disarm()
            self._phase, self._timer = phase, self.loop.call_later(seconds, self._too_slow, phase, seconds)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._phase = None, ""

        def _too_slow(self, phase: str, seconds: float) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            if self.scope is not None and phase == "body":
                self.scope["state"]["cut"] = True  # the handler then knows why its body ended
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            throttle(
                f"slow {phase}",
                f"closed the connection of {client}: its request {phase} took over {seconds:g} s (408)",
            )
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
            self.transport.close()

    return GuardedProtocol


def server_class(guards: Guards, throttle: ThrottledLog) -> type:
    """uvicorn's Server, stopping on SIGTERM or Ctrl-C with exit 0 (not re-raising the signal): it stops
    accepting, waits up to `drain_timeout` for the requests in flight, then closes the connections still open
    and says how many requests it cut."""
    import uvicorn
    from uvicorn.server import HANDLED_SIGNALS

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises a caught SIGTERM after its graceful shutdown, so the process would end by
            # the signal (exit 143); a server that drained and stopped cleanly exits 0.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        async def shutdown(self, sockets: Any = None) -> None:
            in_flight = len(self.server_state.tasks)
            cut = asyncio.get_running_loop().call_later(guards.drain_timeout, self._cut)
            try:
                await super().shutdown(sockets)
            finally:
                cut.cancel()
                throttle.flush()
            if in_flight and not self.cut:
                log.warning(f"drained: answered the {in_flight} request(s) in flight")

        cut = 0

        def _cut(self) -> None:
            self.cut = len(self.server_state.tasks)
            open_ = list(self.server_state.connections)
            log.warning(
                f"drain: --drain-timeout {guards.drain_timeout:g} s passed; cut {self.cut} request(s) in flight "
                f"and closed {len(open_)} connection(s)"
            )
            for connection in open_:
                connection.transport.close()

    return Server


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: a free one); UserError when the port is out of range or the address
    is taken or invalid."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port: must be 1-65535 (or 0 for a free one), got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )[0]
        # proto must say TCP: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets that do, and
        # with it on every response waits ~40 ms for the client's delayed ACK.
        sock = socket.socket(family, kind, proto)
        if os.name != "nt":  # on Windows SO_REUSEADDR would let two servers share a port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def quiet_logs(throttle: ThrottledLog) -> None:
    """lora_rm's own lines on stderr; uvicorn's and asyncio's throttled, with one traceback per exception type."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("lora-rm serve: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    for name in ("uvicorn.error", "asyncio"):
        logging.getLogger(name).addFilter(OneLineFilter(throttle))

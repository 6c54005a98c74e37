"""A TCP proxy with a fault switch, for putting in front of PostgreSQL.

    with TcpProxy("127.0.0.1", 54329) as db:
        url = db.url_for(stack.database_url)  # give this to the process under test
        db.blackhole()  # a network partition: bytes stop, sockets stay open, clients time out
        db.heal()
        db.reject()  # the database restarted: every connection reset, new ones reset at once
        db.heal()

Faults act on the proxy's connections, not on the kernel: in a blackhole this host still
ACKs the client's segments, so TCP keepalives do not notice the partition (queries and
connects time out, which is what the tests need)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

from sqlalchemy.engine import make_url

from tests.faults._loop import LoopThread

Mode = Literal["forward", "blackhole", "reject"]


@dataclass(frozen=True)
class TcpStats:
    #: Connections accepted since the start, including those reset at once by ``reject()``.
    accepted: int
    #: Connections reset at accept because the proxy was rejecting.
    rejected: int
    #: Connections open now (forwarding or held by a blackhole).
    active: int
    bytes_to_server: int
    bytes_to_client: int

    @property
    def bytes_forwarded(self) -> int:
        return self.bytes_to_server + self.bytes_to_client


@dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    #: Set while bytes may flow; a blackhole clears it, so each pump stops before its next write.
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    server: asyncio.StreamWriter | None = None
    closed: bool = False

    def reset(self) -> None:
        """Close both sides with a RST, as a crashed or restarted peer would."""
        self.closed = True
        _reset(self.client)
        if self.server is not None:
            _reset(self.server)
        self.gate.set()  # wake whoever waits on the gate, so it sees ``closed``


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        # SO_LINGER on with a zero timeout: close() sends RST instead of FIN.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TcpProxy:
    """Forwards ``listen_host``:<port> (127.0.0.1 by default; the pod bridge's address for
    clients in pods) to ``target_host:target_port``; see the module docstring."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        connect_timeout: float = 5.0,
        listen_host: str = "127.0.0.1",
    ) -> None:
        self.target_host, self.target_port = target_host, target_port
        self.listen_host = listen_host
        self.connect_timeout = connect_timeout
        self._loop = LoopThread(f"tcp-proxy-{target_host}:{target_port}")
        self._server: asyncio.Server | None = None
        self._mode: Mode = "forward"
        self._conns: set[_Conn] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._accepted = self._rejected = self._to_server = self._to_client = 0
        self.port = 0

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> TcpProxy:
        self._loop.start()
        self.port = self._loop.call(self._start())
        return self

    def close(self) -> None:
        if self._server is not None:
            self._loop.call(self._close())
        self._loop.stop()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def url_for(self, database_url: str) -> str:
        """``database_url`` (a SQLAlchemy or libpq URL) with its host and port replaced by the proxy's."""
        url = make_url(database_url).set(host=self.listen_host, port=self.port)
        return url.render_as_string(hide_password=False)

    # ---- faults (from any thread; each returns once it is in effect) ----------------------

    def blackhole(self) -> None:
        """Stop forwarding on every connection, in both directions, keeping the sockets open;
        accept new connections but never answer them. Clients see timeouts, not errors."""
        self._loop.call(self._set(blackhole=True))

    def reject(self) -> None:
        """Reset (RST) every connection and every new one at once, until ``heal()``."""
        self._loop.call(self._set(reject=True))

    def heal(self, *, resume: bool = False) -> None:
        """Forward again. Connections held by a blackhole are reset (by default: after a long
        partition the server has usually given up on them, and clients must cope with
        that), or with ``resume`` they carry on with whatever bytes were waiting."""
        self._loop.call(self._set(resume=resume))

    @property
    def mode(self) -> Mode:
        return self._mode

    def stats(self) -> TcpStats:
        return self._loop.call(self._stats())

    # ---- inside the loop -------------------------------------------------------------------

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.listen_host, 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        for conn in list(self._conns):
            conn.reset()
        # Let the handlers end by themselves: on Python 3.11, asyncio logs a spurious error
        # for a connection handler task that is cancelled.
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=self.connect_timeout + 1)
        await self._server.wait_closed()

    async def _stats(self) -> TcpStats:
        return TcpStats(
            accepted=self._accepted,
            rejected=self._rejected,
            active=len(self._conns),
            bytes_to_server=self._to_server,
            bytes_to_client=self._to_client,
        )

    async def _set(self, *, blackhole: bool = False, reject: bool = False, resume: bool = False) -> None:
        if blackhole:
            self._mode = "blackhole"
            for conn in self._conns:
                conn.gate.clear()
        elif reject:
            self._mode = "reject"
            for conn in list(self._conns):
                conn.reset()
        else:
            self._mode = "forward"
            for conn in list(self._conns):
                if conn.gate.is_set():
                    continue
                if resume:
                    conn.gate.set()
                else:
                    conn.reset()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._proxy(reader, writer)
        finally:
            self._handlers.discard(task)

    async def _proxy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._accepted += 1
        if self._mode == "reject":
            self._rejected += 1
            _reset(writer)
            return
        conn = _Conn(writer)
        if self._mode == "forward":
            conn.gate.set()
        self._conns.add(conn)
        try:
            # Accepted during a blackhole: the client's first bytes wait in the kernel until heal().
            await conn.gate.wait()
            if conn.closed:
                return
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(self.target_host, self.target_port), self.connect_timeout
                )
            except (OSError, TimeoutError):
                conn.reset()  # the target is down: the client sees its connection reset
                return
            conn.server = up_writer
            if conn.closed:  # reset while connecting
                conn.reset()
                return
            await asyncio.gather(
                self._pump(conn, reader, up_writer, to_server=True),
                self._pump(conn, up_reader, writer, to_server=False),
            )
        finally:
            self._conns.discard(conn)
            if not conn.closed:
                writer.close()
                if conn.server is not None:
                    conn.server.close()

    async def _pump(
        self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, to_server: bool
    ) -> None:
        try:
            while True:
                data = await reader.read(65536)
                # Checked after the read, so a blackhole also holds what was in flight (and EOF).
                await conn.gate.wait()
                if conn.closed:
                    return
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()  # half-close, as the peer did
                    return
                writer.write(data)
                await writer.drain()
                if to_server:
                    self._to_server += len(data)
                else:
                    self._to_client += len(data)
        except OSError:
            # One side reset: the other side sees a reset too.
            conn.reset()

"""Log capture and shipping: records of the ``kubetask`` loggers and everything written to
``sys.stdout``/``sys.stderr`` become :class:`~kubetask.protocol.LogEntry` lines, POSTed in
batches to ``/runner/v1/logs`` from a background thread. Capture is a tee: everything
still reaches the container's real streams, so ``kubectl logs`` shows it.

Shipping is best-effort. A batch is retried for at most :data:`LOG_RETRY_SECONDS` and then
dropped, with a warning on the container's stderr; at the end :meth:`LogShipper.close`
gives what is left the same time in all. Logs never fail an attempt, and never hold up
the report of its outcome for long.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, TextIO, cast

from kubetask.protocol import LogBatch, LogEntry, iso
from kubetask.runner.client import ApiClient, ApiError
from kubetask.sdk.logging import logger as kubetask_logger

#: Longest log line shipped, in UTF-8 bytes (longer ones are cut and marked).
MAX_LINE_BYTES = 16 * 1024
#: Most lines in one POST /runner/v1/logs.
MAX_BATCH_LINES = 500
#: A batch also ends once its messages reach about this many characters.
MAX_BATCH_BYTES = 2 * 1024 * 1024
#: Seconds between two background log flushes.
FLUSH_INTERVAL_SECONDS = 0.5
#: Lines kept while batches cannot be sent; older ones are dropped (and counted) beyond it.
MAX_PENDING_LINES = 100_000
#: How long one batch is retried before it is dropped, and how long closing may take.
LOG_RETRY_SECONDS = 10.0


def truncate_line(message: str, limit: int = MAX_LINE_BYTES) -> str:
    """Cut ``message`` to at most ``limit`` UTF-8 bytes, ending it with a marker when cut."""
    data = message.encode("utf-8", "replace")
    if len(data) <= limit:
        return message
    marker = f" ...[truncated {len(data) - limit} bytes]"
    keep = max(0, limit - len(marker.encode()))
    return data[:keep].decode("utf-8", "ignore") + marker


def _time(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


class LogShipper:
    """Collects log lines and POSTs them in batches from a background thread.

    ``add`` is thread-safe and never blocks on the network. Every ``interval`` seconds the
    thread sends what is pending, ``batch_lines`` at a time, in order; ``close`` stops the
    thread and sends the rest. A batch that cannot be sent within ``send_budget_seconds``
    (or that the API refuses) is dropped, and said so on ``echo``.
    """

    def __init__(
        self,
        api: ApiClient,
        *,
        echo: TextIO | None = None,
        interval: float = FLUSH_INTERVAL_SECONDS,
        batch_lines: int = MAX_BATCH_LINES,
        max_pending: int = MAX_PENDING_LINES,
        send_budget_seconds: float = LOG_RETRY_SECONDS,
    ) -> None:
        self._api = api
        self._echo = echo
        self._interval = interval
        self._batch_lines = batch_lines
        self._max_pending = max_pending
        self._send_budget = send_budget_seconds
        self._pending: deque[LogEntry] = deque()
        self._dropped = 0
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent_lines = 0
        self.lost_lines = 0

    def add(self, level: str, stream: str, message: str, ts: float | None = None) -> None:
        line = LogEntry(
            ts=_time(time.time() if ts is None else ts),
            level=level,
            stream=stream,
            message=truncate_line(message),
        )
        with self._lock:
            if len(self._pending) >= self._max_pending:
                self._pending.popleft()
                self._dropped += 1
            self._pending.append(line)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="kubetask-log-shipper", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush()

    def _take(self) -> list[LogEntry]:
        with self._lock:
            batch: list[LogEntry] = []
            if self._dropped:
                batch.append(
                    LogEntry(
                        ts=_time(time.time()),
                        level="WARNING",
                        stream="log",
                        message=f"[kubetask-runner] {self._dropped} log lines were dropped (buffer full)",
                    )
                )
                self._dropped = 0
            size = 0
            while self._pending and len(batch) < self._batch_lines and size < MAX_BATCH_BYTES:
                line = self._pending.popleft()
                size += len(line.message) + 100
                batch.append(line)
            return batch

    def flush(self, *, deadline: float | None = None) -> bool:
        """Send everything pending now, in batches, each retried for the send budget (and
        not past ``deadline``, a ``time.monotonic()`` value). After a batch fails for good
        (it is dropped) the rest waits for the next flush; returns False then."""
        with self._send_lock:
            while True:
                budget = self._send_budget
                if deadline is not None:
                    budget = min(budget, deadline - time.monotonic())
                    if budget <= 0:
                        return False
                batch = self._take()
                if not batch:
                    return True
                try:
                    self._api.post_logs(LogBatch(lines=batch), budget=budget)
                except ApiError as exc:
                    self.lost_lines += len(batch)
                    self._warn(f"{len(batch)} log lines not shipped: {exc}")
                    return False
                self.sent_lines += len(batch)

    def close(self) -> None:
        """Stop the background thread and send what is left, in at most about the send
        budget in all; what cannot be sent by then is dropped (and said so)."""
        deadline = time.monotonic() + self._send_budget
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()  # a batch in flight ends within its own budget
        if not self.flush(deadline=deadline):
            with self._lock:
                rest = len(self._pending) + self._dropped
                self._pending.clear()
                self._dropped = 0
            if rest:
                self.lost_lines += rest
                self._warn(f"{rest} more log lines not shipped")

    def _warn(self, message: str) -> None:
        if self._echo is not None:
            with contextlib.suppress(Exception):
                self._echo.write(f"kubetask-runner warning: {message}\n")
                self._echo.flush()


class _TeeStream:
    """Stands in for ``sys.stdout``/``sys.stderr``: writes through to the real stream and
    hands every complete line to the shipper."""

    def __init__(self, original: TextIO, shipper: LogShipper, stream: str, level: str) -> None:
        self._original = original
        self._shipper = shipper
        self._stream = stream
        self._level = level
        self._buffer = ""
        self._lock = threading.Lock()

    def write(self, s: str) -> int:
        with contextlib.suppress(OSError, ValueError):
            self._original.write(s)
        with self._lock:
            self._buffer += s
            if "\n" not in self._buffer:
                return len(s)
            *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            self._shipper.add(self._level, self._stream, line.removesuffix("\r"))
        return len(s)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._original.flush()

    def finish(self) -> None:
        """Ship a last line that has no newline yet."""
        with self._lock:
            rest, self._buffer = self._buffer, ""
        if rest:
            self._shipper.add(self._level, self._stream, rest.removesuffix("\r"))

    def __getattr__(self, name: str) -> Any:  # encoding, isatty, fileno, buffer, ...
        return getattr(self._original, name)


def echo_line(echo: TextIO, ts: float, level: str, logger: str, message: str) -> None:
    """Write a runner log line to the container's stderr: ``<ts> <LEVEL> <logger>: <message>``."""
    echo.write(f"{iso(_time(ts))} {level} {logger}: {message}\n")


class _ShipHandler(logging.Handler):
    """Ships records of the ``kubetask`` loggers (stream ``log``) and echoes them to stderr."""

    def __init__(self, shipper: LogShipper, echo: TextIO) -> None:
        super().__init__(logging.NOTSET)
        self._shipper = shipper
        self._echo = echo
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            self._shipper.add(record.levelname, "log", message, ts=record.created)
            echo_line(self._echo, record.created, record.levelname, record.name, message)
            self._echo.flush()
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def capture_output(shipper: LogShipper) -> Iterator[None]:
    """Tee ``sys.stdout``/``sys.stderr`` and the ``kubetask`` loggers into ``shipper``."""
    real_out, real_err = sys.stdout, sys.stderr
    out = _TeeStream(real_out, shipper, "stdout", "INFO")
    err = _TeeStream(real_err, shipper, "stderr", "ERROR")
    handler = _ShipHandler(shipper, real_err)
    saved_level, saved_propagate = kubetask_logger.level, kubetask_logger.propagate
    kubetask_logger.addHandler(handler)
    if kubetask_logger.level == logging.NOTSET:
        kubetask_logger.setLevel(logging.INFO)
    # Records are shipped here once; a root handler (e.g. basicConfig in the task) would
    # print them to the captured stderr and ship them a second time.
    kubetask_logger.propagate = False
    sys.stdout, sys.stderr = cast(TextIO, out), cast(TextIO, err)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = real_out, real_err
        out.finish()
        err.finish()
        kubetask_logger.removeHandler(handler)
        kubetask_logger.setLevel(saved_level)
        kubetask_logger.propagate = saved_propagate

"""A bounded, incremental reader of newline-terminated lines (sans-IO)."""

from __future__ import annotations

from tsnet2.proto.errors import LineTooLong, LocalProtocolError, RemoteProtocolError

__all__ = ["LineReader"]


class LineReader:
    """Split a byte stream into ``\\n``-terminated lines of at most ``max_line`` bytes.

    Usage: :meth:`feed` whatever the socket returned (``b""`` at EOF), then call
    :meth:`next_line` until it returns ``None``. Lines are returned without the ``\\n``.

    Bounds: the *current* line (the first one not yet returned) may not exceed
    ``max_line`` bytes. As soon as more than ``max_line`` bytes are buffered with no
    newline among them, :meth:`feed` (or :meth:`next_line`) raises :class:`LineTooLong`,
    so a caller that drains after each feed never holds more than ``max_line`` + one
    chunk. Bytes after a complete line are not checked until they become the current
    line: they may be a raw stream the caller collects with :meth:`take_rest`.

    Each byte is scanned for ``\\n`` at most once, and the scan never goes beyond
    ``max_line + 1`` bytes into the current line.
    """

    __slots__ = ("_buf", "_eof", "_failed", "_max", "_nl", "_scan")

    def __init__(self, max_line: int) -> None:
        """Create a reader that accepts lines of at most ``max_line`` bytes (without ``\\n``)."""
        if max_line < 1:
            raise LocalProtocolError(f"max_line must be >= 1, got {max_line}")
        self._max = max_line
        self._buf = bytearray()
        self._scan = 0  # buf[:_scan] is known to hold no newline (when _nl is None)
        self._nl: int | None = None  # index of the newline ending the current line
        self._eof = False
        self._failed: LineTooLong | None = None

    @property
    def max_line(self) -> int:
        """The longest accepted line, in bytes, without the newline."""
        return self._max

    @property
    def buffered(self) -> int:
        """Bytes buffered and not yet returned."""
        return len(self._buf)

    @property
    def eof(self) -> bool:
        """True once EOF was fed and no complete line is left to return."""
        return self._eof and self._find() is None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes received from the peer; ``b""`` means the peer closed (EOF).

        Raises :class:`LineTooLong` when the current line already exceeds the limit and
        :class:`LocalProtocolError` when called after EOF with more data.
        """
        if self._failed is not None:
            raise self._failed
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("LineReader.feed called with data after EOF")
        self._buf += data
        self._check()

    def next_line(self) -> bytes | None:
        """Return the next complete line without its ``\\n``, or ``None`` if more data is needed.

        Raises :class:`LineTooLong` if the current line exceeds the limit, and
        :class:`RemoteProtocolError` ("connection closed mid-line") if EOF was fed while
        a partial line is buffered.
        """
        if self._failed is not None:
            raise self._failed
        nl = self._find()
        if nl is None:
            self._check()
            if self._eof and self._buf:
                raise RemoteProtocolError(
                    f"connection closed mid-line ({len(self._buf)} bytes without a newline)"
                )
            return None
        line = bytes(self._buf[:nl])
        del self._buf[: nl + 1]
        self._nl = None
        self._scan = 0
        return line

    def take_rest(self) -> bytes:
        """Remove and return every buffered byte after the lines already returned.

        Use it when a header line is followed by a raw byte stream.
        """
        rest = bytes(self._buf)
        self._buf.clear()
        self._nl = None
        self._scan = 0
        return rest

    def _find(self) -> int | None:
        if self._nl is None:
            limit = self._max + 1  # a newline at index <= max_line ends a valid line
            end = min(len(self._buf), limit)
            if self._scan < end:
                i = self._buf.find(b"\n", self._scan, end)
                if i >= 0:
                    self._nl = i
                else:
                    self._scan = end
        return self._nl

    def _check(self) -> None:
        if self._find() is None and len(self._buf) > self._max:
            self._failed = LineTooLong(
                f"line longer than {self._max} bytes (no newline within the first "
                f"{self._max + 1} bytes); the peer is not speaking this protocol"
            )
            self._buf.clear()
            self._scan = 0
            raise self._failed

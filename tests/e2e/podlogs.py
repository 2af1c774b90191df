"""A container's log as the node holds it, read and followed the way a log collector does
(Fluent Bit's ``tail`` input, Vector's ``kubernetes_logs``): the kubelet's files
``<pod logs dir>/<namespace>_<pod>_<uid>/<container>/<restart>.log`` in CRI format, rotated
to ``<restart>.log.<timestamp>`` (older ones gzipped) when they grow past the kubelet's
``containerLogMaxSize``.

* :func:`log_file_order` sorts a container's files oldest first;
* :class:`FileFollower` follows a container's current file on this machine like ``tail -F``,
  but keeps the open file when it is renamed (rotation) or removed (the pod was deleted)
  and reads it to its end first: what a collector that holds the file open gets;
* :class:`ProcessFollower` collects the output of a follower command on a node
  (``docker exec NODE tail -F ...`` for kind).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import subprocess
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import IO, Protocol

_NAME = re.compile(r"(?P<restart>[0-9]+)\.log(?:\.(?P<stamp>[0-9]{8}-[0-9]{6}))?(?P<gz>\.gz)?")
_CHUNK = 1 << 20


def container_log_dir(root: str | os.PathLike[str], namespace: str, pod: str, uid: str,
                      container: str) -> PurePosixPath:
    """The kubelet's directory of one container's log files under ``root`` (normally
    ``/var/log/pods``)."""
    return PurePosixPath(root) / f"{namespace}_{pod}_{uid}" / container


def log_file_order(names: Iterable[str]) -> list[str]:
    """A container's log file names, oldest first: by restart count, then the rotated files
    by their timestamp, then the current one. Other names are left out."""
    keyed = []
    for name in names:
        m = _NAME.fullmatch(name)
        if m:
            stamp = m.group("stamp")
            keyed.append(((int(m.group("restart")), stamp is None, stamp or ""), name))
    return [name for _key, name in sorted(keyed)]


def read_container_log(directory: Path) -> str:
    """Every log file of a container on this machine, oldest first, as one text."""
    parts = []
    for name in log_file_order(os.listdir(directory)):
        data = (directory / name).read_bytes()
        parts.append(gzip.decompress(data) if name.endswith(".gz") else data)
    return b"".join(parts).decode("utf-8", "replace")


def _current(directory: Path) -> Path | None:
    current = [n for n in log_file_order(os.listdir(directory)) if n.endswith(".log")]
    return directory / current[-1] if current else None


class Follower(Protocol):
    """What the suite needs of a follower: what it read so far, everything it read once
    stopped (what was left read first), and a clean-up that never fails."""

    def text(self) -> str: ...
    def stop(self) -> str: ...
    def close(self) -> None: ...


class FileFollower:
    """Follows a container's current log file in ``directory`` on this machine from its
    first byte until :meth:`stop`.

    The file stays open: when it is renamed (the kubelet rotated it) or removed with the
    pod, what the runtime wrote to it is still read, to its end. A newer current file (a
    rotation, or a restarted container) is taken up once it has data (the runtime has
    reopened its log then, so nothing more goes to the old one) and the old one is read
    to its end.
    """

    def __init__(self, directory: Path, poll: float = 0.1) -> None:
        """Start following (the directory and file may not exist yet)."""
        self.directory = directory
        self.poll = poll
        self._chunks: list[bytes] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="log-follower", daemon=True)
        self._thread.start()

    def _read(self, f: IO[bytes]) -> None:
        while data := f.read(_CHUNK):
            with self._lock:
                self._chunks.append(data)

    def _newer(self, f: IO[bytes]) -> Path | None:
        try:
            path = _current(self.directory)
        except FileNotFoundError:  # the pod's directory is gone
            return None
        if path is None:
            return None
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        mine = os.fstat(f.fileno())
        if (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino) and st.st_size > 0:
            return path
        return None

    def _run(self) -> None:
        f: IO[bytes] | None = None
        try:
            while True:
                stopping = self._stop.is_set()
                if f is None:
                    with contextlib.suppress(FileNotFoundError):
                        path = _current(self.directory)
                        if path is not None:
                            f = path.open("rb")
                if f is not None:
                    self._read(f)
                    newer = self._newer(f)
                    if newer is not None:
                        self._read(f)
                        f.close()
                        f = newer.open("rb")
                        continue
                if stopping:
                    return
                self._stop.wait(self.poll)
        except BaseException as exc:  # reported by text()/stop()
            self._error = exc
        finally:
            if f is not None:
                f.close()

    def text(self) -> str:
        """What was read so far."""
        if self._error is not None:
            raise AssertionError(f"following {self.directory}: {self._error!r}")
        with self._lock:
            return b"".join(self._chunks).decode("utf-8", "replace")

    def stop(self) -> str:
        """Read what is left of the open file, stop, and return everything read."""
        self._stop.set()
        self._thread.join(30)
        if self._thread.is_alive():
            raise AssertionError(f"following {self.directory}: the reader did not stop")
        return self.text()

    def close(self) -> None:
        """Stop reading (idempotent)."""
        self._stop.set()
        self._thread.join(30)

    def __enter__(self) -> FileFollower:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class ProcessFollower:
    """Collects the standard output of ``argv`` (e.g. ``docker exec NODE tail -c +1 -F
    FILE``) until :meth:`stop`, which gives it ``grace`` seconds to pass on what is left,
    then ends it."""

    def __init__(self, argv: Sequence[str], grace: float = 2.0) -> None:
        """Start the command."""
        self.argv = list(argv)
        self.grace = grace
        self._chunks: list[bytes] = []
        self._lock = threading.Lock()
        self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._thread = threading.Thread(target=self._run, name="log-follower", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self._proc.stdout is not None
        while data := os.read(self._proc.stdout.fileno(), _CHUNK):
            with self._lock:
                self._chunks.append(data)

    def text(self) -> str:
        """What was read so far."""
        with self._lock:
            return b"".join(self._chunks).decode("utf-8", "replace")

    def stop(self) -> str:
        """Wait ``grace`` seconds, end the command, return everything it printed."""
        self._thread.join(self.grace)
        self.close()
        return self.text()

    def close(self) -> None:
        """End the command (idempotent)."""
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self._thread.join(10)
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def __enter__(self) -> ProcessFollower:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

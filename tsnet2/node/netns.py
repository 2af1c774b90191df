"""Per-thread network namespace switching (``setns(2)`` on the calling thread only).

A network namespace is a property of a *thread* on Linux: ``setns(fd, CLONE_NEWNET)`` moves
only the calling thread. Sockets (including netlink sockets) are bound to the namespace of the
thread that created them, for their whole life. Child processes inherit the namespace of the
thread that forked them. Python 3.11 has no ``os.setns``, so this uses libc through ctypes.

Caveat: code running in *other*, already running threads (asyncio executors) is not moved;
threads and processes started while inside inherit the namespace of the creating thread.
Open netlink sockets inside the ``with`` block. ``tsnet2.node.rtnl.Rtnl`` opens its socket in
its constructor, so one made inside the block keeps talking to that namespace from any
thread. pyroute2 0.9 (used only by the kernel WireGuard backend, for generic netlink) opens a
new socket lazily in each thread that uses an object, so a pyroute2 object created in one
namespace and used from another thread talks to *that thread's* namespace: use it inside the
block, on the same thread.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["CLONE_NEWNET", "current_netns_fd", "enter_netns", "same_netns"]

CLONE_NEWNET = 0x40000000
_THREAD_NETNS = "/proc/thread-self/ns/net"
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET) failed: {os.strerror(err)}")


def current_netns_fd() -> int:
    """Open (O_CLOEXEC) and return an fd for the calling thread's network namespace."""
    return os.open(_THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)


def same_netns(fd: int) -> bool:
    """True if ``fd`` refers to the calling thread's current network namespace."""
    a = os.fstat(fd)
    b = os.stat(_THREAD_NETNS)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


@contextmanager
def enter_netns(target: str | int) -> Iterator[None]:
    """Move the calling thread into ``target`` (a netns path like /run/netns/x, or an fd).

    On exit the thread returns to the namespace it was in. A no-op when the thread is
    already there. Raises ``FileNotFoundError`` for a missing namespace path.
    """
    own_fd = isinstance(target, str)
    fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC) if isinstance(target, str) else target
    try:
        if same_netns(fd):
            yield
            return
        saved = current_netns_fd()
        try:
            _setns(fd)
            try:
                yield
            finally:
                _setns(saved)
        finally:
            os.close(saved)
    finally:
        if own_fd:
            os.close(fd)

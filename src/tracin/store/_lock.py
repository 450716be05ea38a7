"""One writer per store: ``<store>/.lock`` is held while featurize writes, and names its holder.

The lock is ``fcntl.flock`` on that file where the file system supports it, so the kernel
releases it however the holder ends (even ``kill -9``); the file itself only says who holds it
(pid, host, since when) for the message a second writer gets. Where ``flock`` is unavailable,
the file is the lock (created with ``O_EXCL``), and a lock left by a process that is no longer
running on this host is taken over. Under ``torch.distributed`` only rank 0 takes the lock, for
its whole job. The file is removed on release, exceptions included.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from tracin._errors import StoreError
from tracin._io import not_writable

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "StoreLock"]

LOCK_NAME = ".lock"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_EMPTY_STALE_S = 10.0
"""An empty lock file this old was left by a writer that died before saying who it was."""


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (``True`` when it cannot be told)."""
    if os.name != "posix":
        return True  # os.kill(pid, 0) would terminate it on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


class StoreLock:
    """Exclusive lock of a store folder for one featurize; a context manager.

    Args:
        root: the store folder (created if missing).
        use_flock: ``False`` forces the ``O_EXCL`` file lock (tests, file systems without flock).

    Raises:
        StoreError: on entry, another process holds the lock (naming it and the fix), or the
            folder cannot be written.
    """

    def __init__(self, root: Path, use_flock: bool = True) -> None:
        self.root = root
        self.path = root / LOCK_NAME
        self._use_flock = use_flock and fcntl is not None
        self._fd: int | None = None

    def __enter__(self) -> StoreLock:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._acquire()
        except OSError as exc:
            raise StoreError(not_writable(self.root, exc)) from exc
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def _info(self) -> bytes:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        return json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "since": since}
        ).encode()

    def _acquire(self) -> None:
        for _ in range(5):
            if self._use_flock and self._try_flock():
                return
            if not self._use_flock and self._try_exclusive():
                return
        raise self._busy(self.holder())

    def _try_flock(self) -> bool:
        """Take the flock; ``False`` to retry (the file was replaced meanwhile)."""
        assert fcntl is not None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._busy(self.holder()) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in _NO_FLOCK:
                raise
            self._use_flock = False  # e.g. a network file system without flock
            if os.stat(self.path).st_size == 0:  # only what this open created: no holder
                self.path.unlink(missing_ok=True)
            return False
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:  # released (and removed) while we opened it
            same = False
        if not same:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, self._info())
        self._fd = fd
        return True

    def _try_exclusive(self) -> bool:
        """Create the lock file; take over one whose process died; ``False`` to retry."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            if not self._stale():
                raise self._busy(self.holder()) from None
            self.path.unlink(missing_ok=True)  # best effort: two at once could both take over
            return False
        os.write(fd, self._info())
        os.close(fd)
        self._fd = -1
        return True

    def _stale(self) -> bool:
        """The lock file names a process of this host that has ended (or is empty and old)."""
        holder = self.holder()
        if not holder:
            try:
                return time.time() - self.path.stat().st_mtime > _EMPTY_STALE_S
            except FileNotFoundError:
                return True
        pid = holder.get("pid")
        return (
            holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)
        )

    def holder(self) -> dict[str, Any]:
        """What the lock file says about its holder (``{}`` if unreadable)."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _busy(self, holder: dict[str, Any]) -> StoreError:
        who = (
            f"process {holder.get('pid')} on host {holder.get('host')!r} since "
            f"{holder.get('since')}"
            if holder
            else "another process"
        )
        return StoreError(
            f"store {str(self.root)!r} is being written by {who} (lock file {str(self.path)!r}). "
            "Wait for it to finish, or featurize into another directory; if that process is no "
            "longer running, delete the lock file and run again (it resumes)"
        )

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        if self._fd >= 0:
            os.close(self._fd)  # releases the flock
        self._fd = None

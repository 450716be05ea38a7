"""Files written so that a crash never leaves a half-written one: temporary file, fsync, rename."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["atomic_write", "not_writable"]


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename.

    The file gets the permissions any new file of the user gets (``0o666`` less the umask),
    not ``tempfile``'s private ``0o600``.

    Raises:
        OSError: the folder cannot be created or written (nothing is left behind).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def not_writable(folder: Path, exc: OSError) -> str:
    """A one-line message for a folder that cannot be written (read-only, no permission, full)."""
    return (
        f"cannot write to {str(folder)!r} ({exc.strerror or exc}): choose a folder you can write "
        "to, or fix its permissions or free space"
    )

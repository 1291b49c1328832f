"""One process per SPOOL_DIR: an exclusive flock on SPOOL_DIR/spool.lock, held for the process's life.

Two processes on one directory would each truncate the other's torn tail, unlink segments the
other is appending to and confirm marks the other never reached: acknowledged events lost. So a
second process stops before it touches anything, naming the holder, which wrote its pid in the
file when it took the lock, and its address once it listens.

The name is not DATA_DIR's `clickpulse.lock`: SPOOL_DIR and DATA_DIR may be the same directory,
and one process holding two flocks on one file through two descriptors would lock itself out.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "spool.lock"


class SpoolDirInUse(Exception):
    """Another process holds SPOOL_DIR; a configuration error (exit status 2)."""


class SpoolDirLock:
    def __init__(self, directory: Path) -> None:
        """Blocking. Takes the lock on `directory` (which exists), or raises SpoolDirInUse; an
        OSError if the file cannot be opened."""
        self.path = directory / LOCK_NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolDirInUse(
                f"SPOOL_DIR {directory} is in use by another clickpulse ({describe_holder(self.path)}); "
                "one process per spool directory"
            ) from None
        except OSError:
            os.close(fd)
            raise
        self._fd: int | None = fd
        self._write(f"{os.getpid()}\n")

    def advertise(self, url: str) -> None:
        """Where this process listens, for the message a second one prints."""
        try:
            self._write(f"{os.getpid()} {url}\n")
        except OSError:  # only a message loses its address
            pass

    def _write(self, text: str) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, text.encode(), 0)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            os.close(fd)


def describe_holder(path: Path) -> str:
    """"pid N at URL" from the lock file, as much of it as the holder wrote."""
    try:
        fields = path.read_text().split()
    except OSError:
        fields = []
    if not fields:
        return "pid unknown"
    return f"pid {fields[0]}" + (f" at {fields[1]}" if len(fields) > 1 else "")

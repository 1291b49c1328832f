"""Whether SPOOL_DIR is still the directory the spool opened.

Deleted (`rm -rf`), moved away or replaced by another directory while the service runs, the
spool's open files are unlinked or elsewhere: a record appended now is fsynced into a file no
restart will find. So the directory's identity (st_dev, st_ino) is pinned at open and compared
on every fsync pass (in the pass's worker thread, before any writer is told its record is
durable) and every WATCH_INTERVAL_SECONDS; from the first difference the spool refuses (503),
says why on /readyz, and no longer creates, deletes or reads files by name in that path.
"""

from __future__ import annotations

import os
from pathlib import Path

WATCH_INTERVAL_SECONDS = 1.0


class DirectoryWatch:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._identity: tuple[int, int] | None = None

    def pin(self) -> None:
        """Blocking. The directory as it is now is the spool's."""
        status = os.stat(self.path)
        self._identity = (status.st_dev, status.st_ino)

    def check(self) -> str | None:
        """Blocking (one stat). Why the path no longer names the pinned directory; None if it does."""
        if self._identity is None:
            return None
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            return f"the spool directory {self.path} was deleted or moved away while running"
        except OSError as error:
            return f"the spool directory {self.path} cannot be checked: {error.strerror or error}"
        if (status.st_dev, status.st_ino) != self._identity:
            return f"the spool directory {self.path} was replaced by another directory while running"
        return None

"""The SQLite file's place on disk: private from its first byte.

The database holds every user's ``session_key``. Left to SQLite and the umask
(022 for root and most services), the file comes out 0644 in a new 0755
directory: readable by every local account. So the directories the gateway
creates are 0700 and the database file 0600, whatever the umask; SQLite gives
its ``-wal`` and ``-shm`` files the database file's mode. What already exists
is the operator's choice and is left alone: a directory may be shared on
purpose (``/var/lib``), and a loose database file is only reported
(:func:`exposed`), since changing it under a running gateway would surprise.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

DIRECTORY_MODE = 0o700
FILE_MODE = 0o600
# SQLite's companions of a WAL database, created beside it with its mode.
COMPANIONS = ("-wal", "-shm")


def prepare(path: str) -> None:
    """Create the missing directories of ``path`` (0700) and the empty database (0600).

    An empty file is a valid, empty SQLite database. Several workers may start
    at once: whoever loses a race to create something finds it there and leaves it.
    """
    _make_directories(Path(path).parent)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)  # the umask can only have removed bits; make it exact
        finally:
            os.close(fd)


def _make_directories(directory: Path) -> None:
    missing = []
    while not directory.exists():
        missing.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    for new in reversed(missing):  # outermost first
        try:
            os.mkdir(new, DIRECTORY_MODE)
        except FileExistsError:
            continue  # another worker made it: its mode is already set
        os.chmod(new, DIRECTORY_MODE)


def exposed(path: str) -> list[str]:
    """The database file and companions that exist and grant group or others any access."""
    found = []
    for name in (path, *(path + suffix for suffix in COMPANIONS)):
        try:
            mode = os.stat(name).st_mode
        except OSError:
            continue
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            found.append(f"{name} ({stat.filemode(mode)})")
    return found

"""Durable files: written whole or not at all, and names that survive a power cut.

A file's bytes reach the disk with ``fsync`` on the file; its *name* (a new file, or a
rename) only with ``fsync`` on the folder that holds it. Saved chat sessions and
checkpoint files both need the second half; only the saved session replaces a file.
"""

from __future__ import annotations

import os
import tempfile
from typing import Iterable


def sync_folder_of(path: str) -> None:
    """Make the name of ``path`` (a new file, or a rename onto it) durable.

    Best effort: some file systems refuse to open or sync a folder, and then the name
    is as durable as the file system makes it anyway.
    """
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_whole(path: str, parts: Iterable[bytes], *, prefix: str) -> None:
    """Write ``parts`` to ``path`` whole or not at all, readable by its owner only.

    The bytes go to a temporary file (mode 0600, named ``prefix`` plus a random
    suffix) in the same folder, are synced, then renamed over ``path``: a reader sees
    the old file or the new one, never half of one. The temporary file is removed on
    any failure.
    """
    fd, temporary = tempfile.mkstemp(prefix=prefix, dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    sync_folder_of(path)

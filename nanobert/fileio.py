"""Writing files so that nobody ever reads a half-written one."""

import os
import tempfile
from contextlib import contextmanager


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` to write to. When the block succeeds the file is
    renamed over `path` (one atomic step on POSIX): a crash or a kill mid-write leaves the
    old file, never a truncated new one. On error the temporary file is removed."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

"""Files the host tools write for others to read (systemd units, node_exporter's textfiles)."""

from __future__ import annotations

import os

__all__ = ["write_file"]


def write_file(path: str, text: str, mode: int = 0o644) -> str:
    """Replace ``path`` with ``text`` atomically (a temp file beside it, renamed over it); the path.

    A reader (systemd, node_exporter) sees the old file or the new one, never half of one.
    """
    tmp = f"{os.path.join(os.path.dirname(path), '.' + os.path.basename(path))}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.chmod(tmp, mode)  # not narrowed by the umask
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path

"""What the primary tells its service manager, and how its logs reach the journal.

Some facts about the interfaces (sd_notify(3), sd_watchdog_enabled(3),
systemd.exec(5) "$JOURNAL_STREAM", sd-daemon(3)), written here so no libsystemd
is needed:

* ``$NOTIFY_SOCKET`` names an ``AF_UNIX`` datagram socket; a leading ``@``
  means the abstract namespace (the ``@`` becomes a NUL byte). Each datagram is
  newline-separated ``KEY=VALUE`` lines: ``READY=1``, ``STATUS=...``,
  ``WATCHDOG=1``, ``STOPPING=1``, ``RELOADING=1``. Without the variable the
  process is not under a notify-aware manager and every message is dropped.
* Since systemd 253 a ``RELOADING=1`` must carry ``MONOTONIC_USEC=`` (the
  CLOCK_MONOTONIC time in microseconds), or the reload is not matched to the
  request that caused it; older managers ignore the field. A reload ends with
  ``READY=1``.
* ``$WATCHDOG_USEC`` is the watchdog interval when the unit sets
  ``WatchdogSec=``; it is meant for ``$WATCHDOG_PID`` only (a child must not
  ping for its parent). sd_watchdog_enabled(3) advises pinging at half the
  interval.
* ``$JOURNAL_STREAM`` is ``<device>:<inode>`` of the stream systemd connected to
  stdout/stderr. If stderr's ``fstat`` matches, the journal reads our lines,
  stamps them itself and takes a ``<N>`` prefix (syslog priority, sd-daemon(3))
  as the line's priority; a timestamp of our own would then be a duplicate.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time

__all__ = ["Notifier", "setup_logging", "journal_stderr", "watchdog_interval"]

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class Notifier:
    """Messages to the service manager; silent when there is none (no ``$NOTIFY_SOCKET``)."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if address.startswith("@"):
            self.address = "\0" + address[1:]
        elif address.startswith("/"):
            self.address = address
        self.watchdog = watchdog_interval(env)
        self._socket: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: object) -> bool:
        """Send ``KEY=VALUE`` lines (``ready=1`` becomes ``READY=1``); False if not delivered.

        Never raises: a manager that went away must not take the primary down.
        """
        if self.address is None:
            return False
        text = "".join(f"{key.upper()}={_one_line(value)}\n" for key, value in fields.items())
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto(text.encode(), self.address)
            return True
        except OSError:
            return False

    def status(self, text: str) -> bool:
        return self.send(status=text)

    def reloading(self) -> bool:
        return self.send(reloading=1, monotonic_usec=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval(environ: dict[str, str] | os._Environ[str]) -> float | None:
    """The watchdog interval in seconds if it is meant for this process, else None."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    owner = environ.get("WATCHDOG_PID")
    if usec <= 0 or (owner and owner != str(os.getpid())):
        return None
    return usec / 1e6


def _one_line(value: object) -> str:
    return str(value).replace("\n", " ")


def journal_stderr(environ: dict[str, str] | os._Environ[str] | None = None) -> bool:
    """Whether stderr is the stream systemd connected to the journal."""
    stream = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return bool(inode) and (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):
        return False


class _JournalFormatter(logging.Formatter):
    """``<priority>logger: message``, each line of a traceback prefixed too."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def setup_logging(level: str, journal: bool | None = None) -> None:
    """Log to stderr: priority prefixes and no timestamps for the journal, timestamps in a terminal."""
    handler = logging.StreamHandler()
    if journal_stderr() if journal is None else journal:
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())

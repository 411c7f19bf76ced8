"""systemd notifications: READY, RELOADING, STOPPING, STATUS and the watchdog."""

from __future__ import annotations

import os
from typing import Any


class Notifier:
    """sd_notify, only when systemd asked for it; STATUS kept ASCII (sdnotify encodes latin-1)."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier: Any = None
        if self.enabled:
            import sdnotify

            self._notifier = sdnotify.SystemdNotifier(debug=False)
        usec = os.environ.get("WATCHDOG_USEC", "")
        wd_pid = os.environ.get("WATCHDOG_PID", "")
        self.watchdog = (
            float(usec) / 1e6 / 2
            if usec.isdigit() and int(usec) > 0 and (not wd_pid or wd_pid == str(os.getpid()))
            else 0.0
        )
        self.last_watchdog = 0.0
        self.last_status = ""

    def send(self, *lines: str) -> None:
        if self._notifier is not None:
            text = "\n".join(lines).encode("ascii", "replace").decode("ascii")
            self._notifier.notify(text)

    def status(self, text: str) -> None:
        if text != self.last_status:
            self.last_status = text
            self.send("STATUS=" + text)

    def tick(self, now: float) -> None:
        if self.watchdog and now - self.last_watchdog >= self.watchdog:
            self.last_watchdog = now
            self.send("WATCHDOG=1")

"""Stopping a training session cleanly: on a time budget, on Ctrl-C or on SIGTERM.

The first signal only raises a flag; the loop checks it at the next batch boundary, writes a
checkpoint and returns, so nothing is lost. A second Ctrl-C still interrupts at once (the
default handler is restored after the first), for a user who really means it.
"""

from __future__ import annotations

import signal
import threading
import time


class StopRequest:
    """Context manager; `reason()` says why to stop now, or None to go on."""

    def __init__(self, max_minutes: float | None = None):
        self.deadline = time.monotonic() + max_minutes * 60 if max_minutes else None
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        # the next Ctrl-C raises KeyboardInterrupt, the next SIGTERM terminates
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def reason(self) -> str | None:
        if self.signal_name:
            return self.signal_name
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "time limit (--max-minutes)"
        return None

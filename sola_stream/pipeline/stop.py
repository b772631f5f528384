"""Graceful stop: SIGTERM/SIGINT set a flag that the block loop checks at safe points.

The first signal is acknowledged on stderr at once (a scheduler's log then shows that the job
heard it); a second one stops immediately (the last committed block still resumes).
"""
from __future__ import annotations

import os
import signal
import threading

from sola_stream.errors import SolaError

EXIT_INTERRUPTED = 75  # sysexits EX_TEMPFAIL: stopped at a safe point, run the same command to resume


class Interrupted(SolaError):
    """Not an error: the run stopped where it can resume (printed as "stopped", exit 75)."""

    exit_code = EXIT_INTERRUPTED


class GracefulStop:
    def __init__(self):
        self.requested = False
        self._old = {}

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        name = signal.Signals(signum).name
        # os.write: no buffered I/O inside a signal handler
        os.write(2, f"sola-stream: {name} received; stopping after the current block is committed "
                    f"(send it again to stop at once)\n".encode())

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

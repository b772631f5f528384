"""Graceful stop: SIGTERM/SIGINT set a flag that the block loops (survey and compressing pass)
check at safe points.

The first signal is acknowledged on stderr at once (a scheduler's log then shows that the job
heard it); a second one stops immediately (the last committed block still resumes).
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from sola_stream.errors import SolaError

EXIT_INTERRUPTED = 75  # sysexits EX_TEMPFAIL: stopped at a safe point, run the same command to resume


class Interrupted(SolaError):
    """Not an error: the run stopped where it can resume (printed as "stopped", exit 75)."""

    exit_code = EXIT_INTERRUPTED


STOP_FILE = "stop"  # in the run directory (.sola-run/): a stop request made by creating it


class GracefulStop:
    """`requested` once a signal came, or once `stop_file` exists: a request that any process
    seeing the output directory can make, without signalling the processes of a run (a batch
    script whose run torchrun launched on several nodes; tools/slurm/compress-nodes.sbatch)."""

    def __init__(self, stop_file: Path | None = None):
        self._signalled = False
        self.stop_file = stop_file
        self._old = {}

    @property
    def requested(self) -> bool:
        return self._signalled or (self.stop_file is not None and self.stop_file.exists())

    def _handler(self, signum, frame):
        if self._signalled:
            raise KeyboardInterrupt
        self._signalled = True
        name = signal.Signals(signum).name
        # os.write: no buffered I/O inside a signal handler
        os.write(2, f"sola-stream: {name} received; stopping after the current block (of the survey or the "
                    f"compressing pass; send it again to stop at once)\n".encode())

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

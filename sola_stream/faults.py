"""Named crash points for fault-injection tests (tests/test_resume.py).

With SOLA_STREAM_CRASH_AT="POINT:N" in the environment, the N-th time the process reaches POINT
it kills itself with SIGKILL, as a power cut or an OOM kill would; "POINT:N:TERM" sends SIGTERM
instead (a polite stop request, as a cluster scheduler sends); "POINT:N:SLEEP" pauses there for two
seconds (a window in which a test signals the process from outside). Unset, `hit` costs one lookup.
"""
from __future__ import annotations

import os
import signal
import time

_counts: dict[str, int] = {}
_TARGET = os.environ.get("SOLA_STREAM_CRASH_AT")


def hit(point: str) -> None:
    if not _TARGET:
        return
    name, n, sig = (_TARGET.split(":") + ["1", "KILL"])[:3]
    if name != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == int(n):
        if sig == "SLEEP":
            time.sleep(2.0)
        else:
            os.kill(os.getpid(), signal.SIGTERM if sig == "TERM" else signal.SIGKILL)

"""The run log: one JSON object per line in OUTPUT/sola-stream-log.jsonl, appended as a run goes.

Events: `start` (options, device, threads, the block it starts at: > 0 marks a resume), `block`
(after the block is committed: seconds, peak host RSS and GPU memory during the block, layer
specs, whitened errors, kept fraction), `stopped` (graceful stop) and `done`. Each line is written
with one call and fsynced, so the file can be followed while the run goes (`tail -f`) and a
crash leaves at most a final partial line. The log is this tool's file (removed by --overwrite)
but carries no checksum in the ownership marker: every later run of the command appends to it.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from sola_stream.storage.atomic import write_error

LOG_NAME = "sola-stream-log.jsonl"


class RunLog:
    def __init__(self, out_dir: Path, name: str = LOG_NAME):
        self.path = out_dir / name

    def write(self, event: str, **fields) -> None:
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": event, **fields})
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                os.write(fd, (line + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise write_error(self.path, exc) from None


def read_log(out_dir: Path, name: str = LOG_NAME) -> list[dict]:
    """The log's complete lines (a partial last line, from a crash, is skipped)."""
    path = out_dir / name
    entries = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries

"""Wall seconds spent in each named step of the engine (sola_stream.phases) during one CLI command.

    python tools/phase_times.py [--json FILE] -- compress MODEL OUT [options...]

Runs `sola-stream <args>` in this process with a listener on the engine's steps, then prints the
time of each step: "inclusive" counts the steps nested inside it (decomposition holds whitening,
spectra, allocation and factors), "own" does not. Used for docs/BENCHMARKS.md (what several ratios
share, where a block's time goes).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict

from sola_stream.cli import main
from sola_stream.phases import listening


def timed(argv: list[str]) -> tuple[int, dict[str, dict[str, float]]]:
    inclusive, own, calls = defaultdict(float), defaultdict(float), defaultdict(int)
    stack: list[list] = []  # [name, start, time in nested steps]

    def listener(name: str, entering: bool) -> None:
        now = time.perf_counter()
        if entering:
            stack.append([name, now, 0.0])
            calls[name] += 1
            return
        top, start, nested = stack.pop()
        assert top == name, (top, name)
        inclusive[name] += now - start
        own[name] += now - start - nested
        if stack:
            stack[-1][2] += now - start

    t0 = time.perf_counter()
    with listening(listener):
        rc = main(argv)
    total = time.perf_counter() - t0
    steps = {n: {"calls": calls[n], "inclusive_s": round(inclusive[n], 3), "own_s": round(own[n], 3)}
             for n in sorted(inclusive, key=lambda n: -own[n])}
    return rc, {"total_s": round(total, 3), "steps": steps}


def run() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the sola-stream command and its options")
    args = ap.parse_args()
    argv = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not argv:
        ap.error("give the sola-stream command after --")
    rc, found = timed(argv)
    print(f"\n{'step':<32} {'calls':>6} {'own s':>9} {'inclusive s':>12}")
    for name, f in found["steps"].items():
        print(f"{name:<32} {f['calls']:>6} {f['own_s']:>9.1f} {f['inclusive_s']:>12.1f}")
    print(f"{'whole command':<32} {'':>6} {found['total_s']:>9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": argv, "rc": rc, **found}, f, indent=1)
    return rc


if __name__ == "__main__":
    sys.exit(run())

"""Named steps of a block's work (weights in, statistics, whitening, spectra, allocation, factors,
propagation, ...), announced to whoever listens.

tools/simulate_device_memory.py listens to attribute simulated device memory to each step; with no
listener a step costs one list check.
"""
from __future__ import annotations

from contextlib import contextmanager

_listeners: list = []


@contextmanager
def phase(name: str):
    """The enclosed code is step `name` (steps nest: the innermost one is current)."""
    if not _listeners:
        yield
        return
    for listener in _listeners:
        listener(name, True)
    try:
        yield
    finally:
        for listener in reversed(_listeners):
            listener(name, False)


@contextmanager
def listening(listener):
    """Call `listener(name, entering)` at every step's start (True) and end (False) meanwhile."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)

"""Peak memory of this process: host RSS sampled with psutil, GPU from torch's counters."""
from __future__ import annotations

import threading

import psutil
import torch


class PeakMemory:
    """Context manager sampling host RSS every `interval` seconds in a daemon thread."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak_rss = 0
        self.overall_rss = self.overall_gpu = 0  # peaks over all reset() periods
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def sample(self) -> int:
        rss = self._proc.memory_info().rss
        self.peak_rss = max(self.peak_rss, rss)
        return rss

    def reset(self) -> tuple[int, int]:
        """(peak host RSS, peak GPU allocated) since the last reset, then start a new period."""
        peak = max(self.peak_rss, self.sample())
        gpu = self.peak_gpu()[0]
        self.overall_rss, self.overall_gpu = max(self.overall_rss, peak), max(self.overall_gpu, gpu)
        self.peak_rss = self._proc.memory_info().rss
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return peak, gpu

    def _run(self):
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self):
        self.sample()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()

    @staticmethod
    def peak_gpu() -> tuple[int, int]:
        """(allocated, reserved) peaks in bytes, (0, 0) without CUDA."""
        if not torch.cuda.is_available():
            return 0, 0
        return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()


def release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps it in per-thread arenas: tokenizing a
    calibration corpus would otherwise hold on to a few hundred MB for the rest of the run)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def to_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors moved to the host one by one (each device copy freed before the next moves)."""
    return {k: tensors.pop(k).cpu() for k in list(tensors)}

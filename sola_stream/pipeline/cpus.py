"""How many CPU threads this process may use: affinity, cgroup CPU quota, SLURM allocation.

torch's default is the machine's core count, whatever share of it the process was given; on a
shared node that oversubscribes the cores and runs many times slower than one thread.
"""
from __future__ import annotations

import math
import os
from pathlib import Path


def _cgroup_quota() -> int | None:
    """CPUs allowed by a cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us` limit, if any."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def available_cpus() -> tuple[int, str]:
    """(count, what limited it): the smallest of affinity, cgroup quota and SLURM_CPUS_PER_TASK."""
    limits = {"cores": os.cpu_count() or 1}
    if hasattr(os, "sched_getaffinity"):
        limits["CPU affinity"] = len(os.sched_getaffinity(0))
    if (quota := _cgroup_quota()) is not None:
        limits["cgroup CPU quota"] = quota
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        limits["SLURM_CPUS_PER_TASK"] = int(slurm)
    source = min(limits, key=lambda k: (limits[k], k != "cores"))
    return limits[source], source


def set_threads(requested: int | None, processes: int = 1) -> tuple[int, str]:
    """Set torch's intra-op threads: `requested` (--threads) or what available_cpus() allows,
    divided among the `processes` of a run that share this node (torchrun ranks)."""
    import torch

    n, source = (requested, "--threads") if requested else available_cpus()
    if not requested and processes > 1:
        n, source = max(1, n // processes), f"{source}, shared by {processes} ranks"
    torch.set_num_threads(n)
    return n, source

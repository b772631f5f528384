"""Data-parallel compression on torch.distributed (torchrun; several nodes through torchrun's
rendezvous under SLURM): the collective steps, in one place.

Each rank takes a contiguous share of the calibration windows. At each block the statistics
(covariance sums, neuron |a| sums, token counts) are summed over the ranks, so every rank holds
the statistics of all windows, as one process would, and makes the same decompositions. Stop
requests are agreed, so that every rank stops after the same block.

Status (issue 13): these steps are built and tested on the gloo backend (tests/test_distributed.py);
the block loop does not call them yet (docs/CLUSTER.md, "Several GPUs").
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from sola_stream.errors import InputError


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank `rank` of `world` (1: a single process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Ranks":
        """From torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); a single process without it."""
        values = {}
        for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
            raw = os.environ.get(name)
            try:
                values[name] = default if raw is None else int(raw)
            except ValueError:
                raise InputError(f"environment: {name}={raw!r} is not an integer (set by torchrun)") from None
        ranks = cls(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
        if not (ranks.world >= 1 and 0 <= ranks.rank < ranks.world and ranks.local_rank >= 0):
            raise InputError(f"environment: RANK={ranks.rank}, WORLD_SIZE={ranks.world}, "
                             f"LOCAL_RANK={ranks.local_rank} do not describe a rank of a run")
        return ranks

    @property
    def active(self) -> bool:
        return self.world > 1

    def init(self, device_type: str, timeout_minutes: float = 60.0) -> None:
        """Join the process group (NCCL between GPUs, gloo on CPUs). The timeout bounds how long a
        rank waits for the others at a collective step (a block's decompositions happen between two)."""
        if self.active and not dist.is_initialized():
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=self.rank,
                                    world_size=self.world, timeout=timedelta(minutes=timeout_minutes))

    def share(self, windows: int) -> range:
        """The calibration windows this rank runs: a contiguous share, sizes differing by one at most."""
        if windows < self.world:
            raise InputError(f"--nsamples {windows}: fewer calibration windows than the {self.world} ranks")
        return range(windows * self.rank // self.world, windows * (self.rank + 1) // self.world)

    def sum_statistics(self, cov: dict[str, torch.Tensor], abs_sum: dict[str, torch.Tensor],
                       tokens: dict[str, int]) -> None:
        """Sum a block's statistics over the ranks, in place (BlockStats' `cov`, `abs_sum`, `tokens`).
        A group no token of this rank reached (an expert) joins with zeros."""
        if not self.active:
            return
        mine = {k: (tuple(v.shape), str(v.device)) for k, v in cov.items()}
        mine.update({f"abs:{k}": (tuple(v.shape), str(v.device)) for k, v in abs_sum.items()})
        everyone: list = [None] * self.world
        dist.all_gather_object(everyone, mine)
        device = next((v.device for v in cov.values()), torch.device("cpu"))
        for key in sorted(set().union(*everyone)):
            shape = next(e[key][0] for e in everyone if key in e)
            store, name = (abs_sum, key[4:]) if key.startswith("abs:") else (cov, key)
            if name not in store:
                store[name] = torch.zeros(shape, dtype=torch.float32, device=device)
            dist.all_reduce(store[name])
        names = sorted(k for k in set().union(*everyone) if not k.startswith("abs:"))
        counts = torch.tensor([tokens.get(k, 0) for k in names], dtype=torch.int64, device=device)
        dist.all_reduce(counts)
        tokens.update(zip(names, counts.tolist()))

    def agree(self, flag: bool, device: torch.device | str = "cpu") -> bool:
        """True on every rank when it is true on any (a stop request, a problem found by one rank)."""
        if not self.active:
            return flag
        t = torch.tensor([int(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

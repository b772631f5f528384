"""Data-parallel compression on torch.distributed (torchrun; several nodes through torchrun's
rendezvous under SLURM): the collective steps, in one place.

Each rank takes a contiguous share of the calibration windows. At each block the statistics
(covariance sums, neuron |a| sums, token counts) are summed over the ranks, so every rank holds
the statistics of all windows, as one process would. Stop
requests are agreed, so that every rank stops after the same block.

A block's decompositions are spread over the ranks by cost (`Spread`): each rank whitens and
factors its layers, the spectra's energies are gathered so that every rank makes the same rank
allocation, and each layer's factors are broadcast by the rank that made them (every rank needs
the whole compressed block to carry its windows on). Rank 0 writes and commits; steps only it
does share their result, or their error, with the others (`first`), and steps every rank does
share any rank's error (`check`), so a bad input stops every rank with the same message.
See docs/CLUSTER.md, "Several GPUs and nodes".
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from sola_stream.errors import InputError, SolaError


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank `rank` of `world` (1: a single process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # ranks on this node (they share its host memory)

    @classmethod
    def from_env(cls) -> "Ranks":
        """From torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); a single
        process without it."""
        values = {}
        for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0), ("LOCAL_WORLD_SIZE", None)):
            raw = os.environ.get(name)
            try:
                values[name] = default if raw is None else int(raw)
            except ValueError:
                raise InputError(f"environment: {name}={raw!r} is not an integer (set by torchrun)") from None
        local_world = values["LOCAL_WORLD_SIZE"] if values["LOCAL_WORLD_SIZE"] is not None else values["WORLD_SIZE"]
        ranks = cls(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"], local_world)
        if not (ranks.world >= 1 and 0 <= ranks.rank < ranks.world
                and 0 <= ranks.local_rank < ranks.local_world <= ranks.world):
            raise InputError(f"environment: RANK={ranks.rank}, WORLD_SIZE={ranks.world}, "
                             f"LOCAL_RANK={ranks.local_rank}, LOCAL_WORLD_SIZE={ranks.local_world} "
                             "do not describe a rank of a run")
        return ranks

    @property
    def active(self) -> bool:
        return self.world > 1

    def init(self, device_type: str, timeout_minutes: float = 60.0) -> None:
        """Join the process group (NCCL between GPUs, each rank on GPU LOCAL_RANK; gloo on CPUs).
        The timeout bounds how long a rank waits for the others at a collective step."""
        if self.active and not dist.is_initialized():
            if device_type == "cuda":
                torch.cuda.set_device(self.local_rank)
            try:
                dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=self.rank,
                                        world_size=self.world, timeout=timedelta(minutes=timeout_minutes))
            except ValueError as exc:  # the environment torchrun sets is incomplete
                raise InputError(f"environment: RANK={self.rank} WORLD_SIZE={self.world} ask for a run of several "
                                 f"processes, which cannot start: {exc} (launch it with torchrun)") from None

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()

    def device(self, device: torch.device) -> torch.device:
        """The device this rank computes on: `cuda` means its own GPU (LOCAL_RANK) under torchrun."""
        if self.active and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

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

    def agree(self, flag: bool) -> bool:
        """True on every rank when it is true on any (a stop request, a problem found by one rank)."""
        if not self.active:
            return flag
        t = torch.tensor([int(flag)], device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def first(self, fn, share=lambda value: value):
        """`fn()` on rank 0 only; every other rank gets `share(result)`, or raises the SolaError
        that rank 0 raised (the same message and exit code everywhere)."""
        if not self.active:
            return fn()
        box: list = [None]
        value = None
        if self.rank == 0:
            try:
                value = fn()
                box[0] = ("ok", share(value))
            except SolaError as exc:
                box[0] = ("error", _portable(exc))
                dist.broadcast_object_list(box, src=0)
                raise
        dist.broadcast_object_list(box, src=0)
        kind, payload = box[0]
        if kind == "error":
            raise payload
        return value if self.rank == 0 else payload

    def check(self, fn) -> list:
        """`fn()` on every rank; returns every rank's result (by rank), or raises on every rank the
        SolaError of the lowest rank that raised one."""
        try:
            mine = ("ok", fn())
        except SolaError as exc:
            if not self.active:
                raise
            mine = ("error", _portable(exc))
        if not self.active:
            return [mine[1]]
        everyone: list = [None] * self.world
        dist.all_gather_object(everyone, mine)
        for kind, payload in everyone:
            if kind == "error":
                raise payload
        return [payload for _, payload in everyone]

    def everywhere(self, fn):
        """`fn()` on every rank, any rank's SolaError raised on all (as `check`); returns this
        rank's own result (nothing crosses but errors)."""
        box: list = []
        self.check(lambda: box.append(fn()))
        return box[0]

    def sum_numbers(self, values: list[float]) -> list[float]:
        """Float64 sums over the ranks (a survey's update ratios and token counts)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return t.tolist()

    @property
    def comm_device(self) -> torch.device:
        """Where collective tensors live: the rank's GPU under NCCL, else the CPU."""
        if dist.is_initialized() and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def spread(self) -> "Spread | None":
        return Spread(self) if self.active else None


SINGLE = Ranks()  # a run of one process


def _portable(exc: SolaError) -> SolaError:
    """The error as it crosses to other ranks: its class and message (tracebacks do not pickle)."""
    return type(exc)(str(exc))


class Spread:
    """A block's decompositions shared out among the ranks (method/block_compress.py calls it):
    `assign` gives each layer an owner by cost (largest first, to the least loaded rank; the same
    on every rank, from shapes only), `share` gathers the owners' energies and damping, `collect`
    broadcasts each layer's fit from its owner."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self.owner: dict[str, int] = {}

    def assign(self, costs: dict[str, float]) -> list[float]:
        """Owners by cost; returns each rank's total cost (its load)."""
        load = [0.0] * self.ranks.world
        self.owner = {}
        for name in sorted(costs, key=lambda k: (-costs[k], k)):
            r = min(range(self.ranks.world), key=lambda j: (load[j], j))
            self.owner[name] = r
            load[r] += costs[name]
        return load

    def mine(self, name: str) -> bool:
        return self.owner.get(name, 0) == self.ranks.rank

    def share(self, energies: dict[str, torch.Tensor], damping: dict[str, float]):
        """Every layer's energies (CPU, as the owner computed them) and the union of the damping."""
        everyone: list = [None] * self.ranks.world
        dist.all_gather_object(everyone, ({k: v.cpu() for k, v in energies.items()}, damping))
        out_e: dict[str, torch.Tensor] = {}
        out_d: dict[str, float] = {}
        for e, d in everyone:
            out_e.update(e)
            out_d.update(d)
        return out_e, out_d

    def collect(self, fitted: dict[str, tuple[dict, dict, float]], order: list[str]) -> dict:
        """Every layer's (tensors, spec, error), in `order`: this rank's own, the rest from their
        owners. Tensors travel as bytes (any dtype, either backend) and arrive on the CPU."""
        dev = self.ranks.comm_device
        out = {}
        for name in order:
            src = self.owner.get(name, 0)
            box = [None]
            if src == self.ranks.rank:
                tensors, spec, error = fitted[name]
                box[0] = ({k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}, spec, error)
            dist.broadcast_object_list(box, src=src)
            meta, spec, error = box[0]
            got = {}
            for k, (shape, dtype) in meta.items():
                if src == self.ranks.rank:
                    buf = fitted[name][0][k].contiguous().reshape(-1).view(torch.uint8).to(dev)
                else:
                    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                    buf = torch.empty(nbytes, dtype=torch.uint8, device=dev)
                dist.broadcast(buf, src=src)
                got[k] = fitted[name][0][k] if src == self.ranks.rank else buf.cpu().view(dtype).reshape(shape)
            out[name] = (got, spec, error)
        return out

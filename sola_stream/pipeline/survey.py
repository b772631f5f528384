"""Model-wide rank allocation (--allocation global): a survey pass, then one budget per block.

A streaming run decides block i's ranks before it sees block i+1. To let blocks trade parameters,
a first pass runs the calibration states through the *original* blocks (statistics only, nothing
written), whitens and factors every layer as the compressing pass would (same prime split, same
candidates), and keeps only each candidate's energies. One greedy allocation over all candidates
of all blocks (method/allocate.py) then gives each block its parameter budget; the compressing
pass allocates inside each block on its own statistics within that budget. The budgets are
recorded in the run manifest, so a resumed run uses the same.

Across blocks a layer's error is not worth the same everywhere. By default the survey measures
what it is worth (pipeline/probe.py, `--probe-windows`): the KL divergence of the model's
predictions per unit of the layer's whitened error, and every rank's gain is weighted by it, in
the survey's allocation and in the compressing pass's (the weights are recorded in the manifest
beside the budgets). With `--probe-windows 0` a cheaper heuristic stands in: a layer's relative
error counts in proportion to its block's relative update of the residual stream
(||h_out - h_in||^2 / ||h_in||^2, mean over tokens); unweighted, the model-wide allocation starved
the first and last blocks and lost to the per-block one (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from sola_stream import faults
from sola_stream.method.allocate import Candidate, allocate, factored_params
from sola_stream.method.block_compress import Layout
from sola_stream.nn.build import build_block
from sola_stream.pipeline.block_forward import BlockStats, _to
from sola_stream.pipeline.distributed import SINGLE, Ranks
from sola_stream.errors import InputError
from sola_stream.pipeline.memory import to_host
from sola_stream.pipeline.probe import Probe, importance
from sola_stream.storage.input_checks import check_finite_tensors
from sola_stream.phases import phase


@dataclass
class Survey:
    """Every block's candidates (energies, weighted), and its fixed and dense parameters: what a
    model-wide allocation needs, for any ratio (shared by the outputs of a multi-ratio run);
    `importance`: each block's measured layer weights (None without a probe)."""

    candidates: list[Candidate]
    fixed: list[int]
    dense: list[int]
    importance: list[dict[str, float]] | None = None

    def budgets(self, ratio: float) -> list[int]:
        """Per-block parameter budgets (block linear weights) that remove `ratio` of the model's."""
        total = math.floor((1.0 - ratio) * sum(self.dense)) - sum(self.fixed)
        if total <= 0:
            raise ValueError(f"ratio {ratio} leaves no room beyond the prime neurons")
        ranks = allocate(self.candidates, total)
        budgets = list(self.fixed)
        for c in self.candidates:  # rank None: dense (m n); 0: nothing yet (the compressing pass keeps 1)
            budgets[int(c.name.split(":", 1)[0])] += factored_params(c.m, c.n, ranks[c.name])
        return budgets


@torch.no_grad()
def survey(skeleton, states: torch.Tensor, kwargs: dict[int, dict], probe_ids: torch.Tensor, options, device,
           batch: int, release=None, begin_pass=None, progress: bool = True, ranks: Ranks = SINGLE,
           after_block=None) -> Survey:
    """The survey pass (module docstring). `states` (the first block's inputs) are overwritten
    block by block; `probe_ids`: the probe's token windows (none: no probe), drawn apart from the
    calibration windows; `release(k)` once windows before k are done, `begin_pass()` before each block
    (a spilled cache drops its pages window by window in every pass). `ranks`: each holds its
    share of the windows; statistics and updates are summed, spectra shared out. `after_block(i)`
    is called on every rank after each block: where a stop request is obeyed (it raises)."""
    family, n = skeleton.family, skeleton.num_blocks
    found: list[tuple[int, Candidate, float]] = []  # block, candidate, its block's relative update
    fixed, dense = [0] * n, [0] * n
    # the probe runs on the first process alone (every rank has the same probe windows): the same
    # weights as one process would measure
    probing = len(probe_ids) > 0
    probe = Probe(skeleton.embed(probe_ids)[0]) if probing and ranks.rank == 0 else None
    bar = tqdm(range(n), desc="survey", unit="block", disable=not progress)
    for i in bar:
        prefix = family.block_prefix(i)
        weights = skeleton.reader.tensors(prefix)
        check_finite_tensors(weights, skeleton.reader, prefix)
        with phase("survey"), _naming(i, prefix):
            block = build_block(skeleton.meta_block(i), weights, None, device, torch.float32)
            stats = BlockStats(block, family)
            if begin_pass is not None:
                begin_pass()
            total, count = ranks.sum_numbers(list(ranks.everywhere(
                lambda b=block: _propagate(b, states, kwargs[i], device, batch, release, i, prefix))))
            update = total / max(count, 1)
            stats.remove()
            if probe is None:  # freed before the decompositions (the probe needs it after them)
                del block
            ranks.sum_statistics(stats.cov, stats.abs_sum, stats.tokens)
            covs, scores = stats.cov, stats.neuron_scores()
            if getattr(options, "decompose_on", "device") == "host":  # the plan found the device too small
                covs, scores = to_host(covs), to_host(scores)
            # no ranks allocated: only the spectra and the split are used. A probe cuts every layer,
            # so its process factors all of them (no spread)
            layout = Layout(weights, covs, scores, family, options.method, None, options.prime_ratio,
                            values_only=probe is None, spread=None if probing else ranks.spread())
            if probing:
                with phase("probe"):
                    ranks.first(lambda: probe.block(i, block, layout, weights, kwargs[i], device))
            if probe is not None:
                del block
        fixed[i], dense[i] = layout.fixed, layout.dense_params
        found += [(i, Candidate(f"{i}:{c.name}", c.m, c.n, c.energy.cpu()), update) for c in layout.candidates]
        del layout, stats, weights
        faults.hit("survey_block")
        if after_block is not None:
            try:
                after_block(i)
            except BaseException:
                bar.close()  # the stop message starts on a line of its own
                raise
    if not probing:  # a layer's relative error, restated relative to the residual stream
        for _, c, update in found:
            c.weight = update / (float(c.energy.double().clamp_min(0).sum()) or 1.0)
        return Survey([c for _, c, _ in found], fixed, dense)
    with phase("probe"):
        weights_of = ranks.first(lambda: importance(probe.finish(skeleton, device)))
    per_block: list[dict[str, float]] = [{} for _ in range(n)]
    for i, c, _ in found:
        c.weight = per_block[i][c.name.split(":", 1)[1]] = weights_of[c.name]
    return Survey([c for _, c, _ in found], fixed, dense, per_block)

@contextmanager
def _naming(i: int, prefix: str):
    """Errors of block i's survey say which block (as the compressing pass's do; non-finite
    states are InputErrors that name it already, _propagate)."""
    try:
        yield
    except ValueError as exc:
        raise ValueError(f"block {i} ({prefix}*): {exc}") from None


def _propagate(block, states: torch.Tensor, kwargs: dict, device, batch: int, release, i: int,
               prefix: str) -> tuple[float, int]:
    """Run `states` through `block` in place; returns the sum over tokens of the block's relative
    update ||h_out - h_in||^2 / ||h_in||^2 (how much the block changes the residual stream) and
    the number of tokens."""
    kw = {k: _to(v, device) for k, v in kwargs.items()}
    total, count = 0.0, 0
    for s in range(0, states.shape[0], batch):
        inp = states[s:s + batch].to(device)
        out = block(inp, **kw)
        out = out[0] if isinstance(out, tuple) else out
        if not torch.isfinite(out).all():  # an InputError: every rank of a run raises it (Ranks.everywhere)
            raise InputError(f"calibration states in the survey pass, block {i} ({prefix}*): non-finite block "
                             f"output for calibration windows {s}..{s + len(out) - 1}: NaN or Inf values")
        # one chunk-sized temporary (out - inp), counted by the plan
        ratio = (torch.linalg.vector_norm(out - inp, dim=-1) / torch.linalg.vector_norm(inp, dim=-1).clamp_min(1e-30)) ** 2
        total += float(ratio.sum())
        count += ratio.numel()
        states[s:s + batch].copy_(out.to(states.dtype))
        if release is not None:
            release(s + batch)
    return total, count

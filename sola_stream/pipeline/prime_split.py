"""`--prime-ratio auto`: each block's prime split chosen by measuring the block's output error.

The split between prime neurons (FFN rows/columns kept dense) and marginal ones (factored) is
SoLA's largest lever, and its best value moves with the parameter budget (SmolLM2 with the
probe: about 0.55 at 20%, 0.35 at 30%, 0.25 at 40%; docs/BENCHMARKS.md). Whitened energies do not
see what a prime neuron is worth (its error is multiplied by the nonlinearity downstream: an
allocation choosing the split from energies kept almost none and lost), so the split is chosen
by measurement: the block is compressed at each candidate split within the same parameter budget,
each compressed block is run on a few calibration windows, and the split whose output is closest
to the original block's (squared error summed over the windows) is kept. The budget, and so the
ratio, is the same for every candidate; only how the block spends it changes.
"""
from __future__ import annotations

import torch

from sola_stream.method.block_compress import BudgetError
from sola_stream.pipeline.block_forward import run_block
from sola_stream.errors import InputError
from sola_stream.phases import phase
from sola_stream.pipeline.distributed import SINGLE, Ranks

WINDOWS = 4  # calibration windows a block's candidates are compared on


@torch.no_grad()
def choose_split(choices, fit, build, states: torch.Tensor, kwargs: dict, device, batch: int,
                 ranks: Ranks = SINGLE, what: str = "calibration states", labels: list[str] | None = None):
    """For each output of a block (one per ratio), its result at the split in `choices` whose block
    output is closest to the original's. `fit(split)`: the block's results at that split, one per
    output (a BudgetError instead for an output whose budget the split does not fit: skipped for
    it); `build(tensors, specs)`: a block module (specs None: the original block, run once for
    every output); `states`: this process's share of the windows compared on (the run's first
    WINDOWS; errors are summed over the processes of a run, so every one of them chooses what one
    process would). Non-finite outputs are an InputError saying `what`, raised on every process;
    an output that no split fits, a ValueError naming its `labels` entry (its ratio).
    Returns [(result, split, errors by split)] by output."""
    def outputs(block) -> torch.Tensor:
        return ranks.everywhere(lambda: _outputs(block, states, kwargs, device, batch, what))

    reference = outputs(build(None, None))
    best: list = []  # by output: (result, split) so far
    errors: list[dict] = []
    for split in choices:
        results = fit(split)
        if not best:
            best, errors = [None] * len(results), [{} for _ in results]
        for j in range(len(results)):
            result, results[j] = results[j], None  # the best one kept, the others freed as they are compared
            if isinstance(result, BudgetError):  # more prime neurons than the budget pays for
                del result
                continue
            out = outputs(build(result.tensors, result.specs))
            errors[j][split] = ranks.sum_numbers([float((out - reference).double().square().sum())])[0]
            if best[j] is None or errors[j][split] < errors[j][best[j][1]]:
                best[j] = (result, split)
            del result, out
    if not best or any(b is None for b in best):
        unfit = [labels[j] for j, b in enumerate(best) if b is None] if labels else []
        raise ValueError(f"no prime split of {', '.join(map(str, choices))} fits the block's budget"
                         + (f" ({', '.join(unfit)})" if unfit else ""))
    return [(result, split, errs) for (result, split), errs in zip(best, errors)]


def _outputs(block, x: torch.Tensor, kwargs: dict, device, batch: int, what: str) -> torch.Tensor:
    with phase("prime split choice"):
        out = torch.empty(x.shape, dtype=torch.float32)
        try:
            run_block(block, x, kwargs, device, batch, out=out)
        except FloatingPointError as exc:
            raise InputError(f"{what}: NaN or Inf values: {exc}") from None
        return out

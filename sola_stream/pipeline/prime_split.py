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
                 ranks: Ranks = SINGLE, what: str = "calibration states"):
    """The block result of the split in `choices` whose block output is closest to the original's.
    `fit(split)`: the block's result at that split (BudgetError: the split does not fit the
    budget, skipped); `build(tensors, specs)`: a block module (specs None: the original block);
    `states`: this process's share of the windows compared on (the run's first WINDOWS; errors
    are summed over the processes of a run, so every one of them chooses what one process would).
    Non-finite outputs are an InputError saying `what`, raised on every process.
    Returns (result, split, errors by split)."""
    def outputs(block) -> torch.Tensor:
        return ranks.everywhere(lambda: _outputs(block, states, kwargs, device, batch, what))

    reference = outputs(build(None, None))
    best, errors = None, {}
    for split in choices:
        try:
            result = fit(split)
        except BudgetError:  # more prime neurons than the budget pays for (any other error is raised)
            continue
        out = outputs(build(result.tensors, result.specs))
        errors[split] = ranks.sum_numbers([float((out - reference).double().square().sum())])[0]
        if best is None or errors[split] < errors[best[1]]:
            best = (result, split)
        del result, out
    if best is None:
        raise ValueError(f"no prime split of {', '.join(map(str, choices))} fits the block's budget")
    return best[0], best[1], errors


def _outputs(block, x: torch.Tensor, kwargs: dict, device, batch: int, what: str) -> torch.Tensor:
    with phase("prime split choice"):
        out = torch.empty(x.shape, dtype=torch.float32)
        try:
            run_block(block, x, kwargs, device, batch, out=out)
        except FloatingPointError as exc:
            raise InputError(f"{what}: NaN or Inf values: {exc}") from None
        return out

"""Running calibration states through one block, and the statistics gathered on the way.

Per block: the input covariance of each input group of the family (for LLaMA: q/k/v, o, gate/up,
down), plus each FFN neuron's score s_j = mean |a_j| over calibration tokens.
Sums are float32 on the compute device.
"""
from __future__ import annotations

import torch
from torch import nn

from sola_stream.families import Family


class StopForward(Exception):
    """Ends a forward pass whose remaining work is not needed: raised by the last statistics hook
    of a block, and by the skeleton's recorder of the last block."""


class BlockStats:
    """Forward pre-hooks that accumulate X^T X per input group of the family while a block runs,
    and each FFN neuron's sum of |a_j| on the input of its neuron columns' layer. Tokens are
    counted per group: a group sees only the tokens that reach it.

    With `stop_early`, the hook of the last input group (the FFN output projection in every
    family so far) ends the chunk's forward there: in a statistics-only pass the projection itself
    and the residual add are wasted work (a quarter of a LLaMA block's weights)."""

    def __init__(self, block: nn.Module, family: Family, stop_early: bool = False):
        self.stop_early = stop_early
        self.last = family.groups[-1].key
        self.neuron_keys = {family.neuron_key(n) for n in family.neuron_groups}
        self.cov: dict[str, torch.Tensor] = {}
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._handles = [block.get_submodule(g.linears[0]).register_forward_pre_hook(self._hook(g.key))
                         for g in family.groups]

    def _hook(self, key: str):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            cov = self.cov.get(key)
            if cov is None:
                cov = self.cov[key] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            cov.addmm_(x.T, x)
            self.tokens[key] = self.tokens.get(key, 0) + x.shape[0]
            if key in self.neuron_keys:
                s = torch.linalg.vector_norm(x, ord=1, dim=0)  # sum |a_j| without an |x| copy
                self.abs_sum[key] = s if key not in self.abs_sum else self.abs_sum[key] + s
            if key == self.last and self.stop_early:
                raise StopForward
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def covariance(self, key: str) -> torch.Tensor:
        return self.cov[key]

    def neuron_scores(self) -> dict[str, torch.Tensor]:
        """Per neuron group (by the key of its activations' input group): mean |a_j| over the
        calibration tokens that reached it, one per neuron."""
        return {k: s / max(self.tokens[k], 1) for k, s in self.abs_sum.items()}


@torch.no_grad()
def run_block(block: nn.Module, states: torch.Tensor, kwargs: dict, device: torch.device | str,
              batch_size: int, out: torch.Tensor | None, release=None) -> torch.Tensor | None:
    """Run all states (windows x seq x hidden) through `block`, `batch_size` windows at a time.

    Outputs go to `out` (which may be `states` itself: each chunk is read before it is
    overwritten), or nowhere when `out` is None (a pass only for the statistics hooks).
    `release(k)` is called once windows before k are done (a disk cache drops their pages).
    """
    kw = {k: _to(v, device) for k, v in kwargs.items()}
    for start in range(0, states.shape[0], batch_size):
        chunk = states[start:start + batch_size].to(device, non_blocking=True)
        try:
            res = block(chunk, **kw)
        except StopForward:
            if out is not None:
                raise RuntimeError("a statistics pass that stops early has no outputs") from None
            if release is not None:
                release(start + batch_size)
            continue
        res = res[0] if isinstance(res, tuple) else res
        if not torch.isfinite(res).all():
            raise FloatingPointError(f"non-finite block output for calibration windows {start}..{start + len(chunk) - 1}")
        if out is not None:
            out[start:start + batch_size].copy_(res.to(out.dtype))
        if release is not None:
            release(start + batch_size)
    return out


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value

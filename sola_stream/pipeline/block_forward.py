"""Running calibration states through one block, and the statistics gathered on the way.

Per block: the input covariance of the attention projections (q/k/v share one input), of the
output projection, of the FFN input (gate/up share it) and of the down projection's input (the
FFN neurons), plus each neuron's score s_j = mean |a_j| over calibration tokens.
Sums are float32 on the compute device.
"""
from __future__ import annotations

import torch
from torch import nn

from sola_stream.families import Adapter


class StatsDone(Exception):
    """Raised by the last hook of a block when the block's output is not needed."""


class BlockStats:
    """Forward pre-hooks that accumulate X^T X per input group while a block runs.

    With `stop_early`, the hook on the FFN output projection's input (the last statistic of a
    block) ends the chunk's forward there: in a statistics-only pass the projection itself and the
    residual add are wasted work (a quarter of a LLaMA block's weights)."""

    def __init__(self, block: nn.Module, adapter: Adapter, stop_early: bool = False):
        self.stop_early = stop_early
        self.groups = {adapter.qkv[0]: "attn_in", adapter.out_proj: "attn_out", adapter.ffn_in[0]: "ffn_in",
                       adapter.ffn_out: "ffn_mid"}
        self.cov: dict[str, torch.Tensor] = {}
        self.abs_sum: torch.Tensor | None = None
        self.tokens = 0
        self._handles = [block.get_submodule(name).register_forward_pre_hook(self._hook(key))
                         for name, key in self.groups.items()]

    def _hook(self, key: str):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            cov = self.cov.get(key)
            if cov is None:
                cov = self.cov[key] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            cov.addmm_(x.T, x)
            if key == "attn_in":
                self.tokens += x.shape[0]
            if key == "ffn_mid":
                s = torch.linalg.vector_norm(x, ord=1, dim=0)  # sum |a_j| without an |x| copy
                self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
                if self.stop_early:
                    raise StatsDone
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def covariance(self, key: str) -> torch.Tensor:
        return self.cov[key]

    def neuron_scores(self) -> torch.Tensor:
        """Mean |a_j| over calibration tokens, one per FFN neuron."""
        return self.abs_sum / max(self.tokens, 1)


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
        except StatsDone:
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

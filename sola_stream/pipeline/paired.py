"""One block compressed with the error-compensating fit (--fit compensate; docs/METHOD.md).

Two streams of calibration states enter the block: x, what the original model computes, and x^,
what the compressed model computes (the same windows, token for token). Input groups are fitted in
forward order; each group's statistics come from one paired pass over the windows:
- the original block runs on x up to the group and hands over its input X;
- a working block runs on x^ up to the group and hands over its input X^: the original block for
  the first group, then the block with every group fitted so far already compressed, so each
  layer also compensates the error of the compressed layers before it in the same block;
- C = X^T^ X^ and M = X^T X^ are summed chunk by chunk (tokens paired exactly).
The first pass also gathers the plain statistics (every group on x^, neuron scores) that the
prime split and the ranks are chosen on (method/block_compress.py Layout). Expert layers (whose
tokens are routed differently in the two streams) take the plain fit from those statistics.
The last pass carries x through the whole original block to the next block; x^ then goes through
the finished compressed block.
"""
from __future__ import annotations

import torch
from torch import nn

from sola_stream.method.block_compress import BlockResult, Layout
from sola_stream.method.compensate import local_and_cumulative
from sola_stream.method.decompose import submatrix
from sola_stream.nn.build import build_block
from sola_stream.pipeline.block_forward import BlockStats, StopForward, _to
from sola_stream.phases import phase


class _Take:
    """A forward pre-hook handing over the input of one layer per chunk, optionally ending the
    forward there."""

    def __init__(self, module: nn.Module, stop: bool):
        self.value: torch.Tensor | None = None
        self.stop = stop
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.value = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        if self.stop:
            raise StopForward


def _forward(block: nn.Module, chunk: torch.Tensor, kw: dict) -> torch.Tensor | None:
    try:
        out = block(chunk, **kw)
    except StopForward:
        return None
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def paired_pass(orig: nn.Module, work: nn.Module, layer: str, x: torch.Tensor, xh: torch.Tensor, kwargs: dict,
                device, batch: int, x_out: torch.Tensor | None = None, covariance: bool = True,
                release=None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(C, M) of `layer`'s input: C over the working block's inputs (None when `covariance` is
    off: hooks already sum it), M against the original block's. With `x_out`, the original
    block runs to the end and writes its outputs there (the next block's x)."""
    kw = {k: _to(v, device) for k, v in kwargs.items()}
    take_x = _Take(orig.get_submodule(layer), stop=x_out is None)
    take_xh = _Take(work.get_submodule(layer), stop=covariance)  # else the statistics hooks run on
    cov = cross = None
    try:
        for s in range(0, x.shape[0], batch):
            # x^ first: with --propagate original both streams are one tensor, overwritten below
            _forward(work, xh[s:s + batch].to(device, non_blocking=True), kw)
            out = _forward(orig, x[s:s + batch].to(device, non_blocking=True), kw)
            if x_out is not None:
                if not torch.isfinite(out).all():
                    raise FloatingPointError(f"non-finite block output for calibration windows "
                                             f"{s}..{s + len(out) - 1}")
                x_out[s:s + batch].copy_(out.to(x_out.dtype))
            a, b = take_x.value, take_xh.value
            take_x.value = take_xh.value = None
            if cross is None:
                cross = torch.zeros(a.shape[1], b.shape[1], dtype=torch.float32, device=b.device)
                cov = torch.zeros_like(cross) if covariance else None
            cross.addmm_(a.T, b)
            if cov is not None:
                cov.addmm_(b.T, b)
            if release is not None:
                release(s + batch)
    finally:
        take_x.handle.remove()
        take_xh.handle.remove()
    return cov, cross


def compress_compensated(meta_block: nn.Module, weights: dict[str, torch.Tensor], family, layout_args: tuple,
                         kwargs: dict, device, batch: int, x: torch.Tensor, xh: torch.Tensor,
                         x_out: torch.Tensor | None, begin_pass, release, storage: torch.dtype,
                         check_finite) -> BlockResult:
    """The compensated fit of one block (module docstring). `layout_args`: Layout's arguments
    after `family` (method, ratio, prime ratio, block budget or None, ...); `x`, `xh`: the two streams entering it (one tensor with --propagate original);
    `x_out`: where the original block's outputs go (None: nowhere); `begin_pass()` before each
    pass over the windows (page release restarts there); `check_finite(t, what)` raises on NaN/Inf."""
    stages = [g for g in family.groups if not (family.experts and g.linears[0].startswith(family.experts.path + "."))]
    with phase("weights in"):
        orig = build_block(meta_block, weights, None, device, torch.float32)
        work = build_block(meta_block, weights, None, device, torch.float32)
    stats = BlockStats(work, family, stop_early=True)
    last = len(stages) - 1
    begin_pass()
    with phase("statistics"):
        _, cross = paired_pass(orig, work, stages[0].linears[0], x, xh, kwargs, device, batch,
                               x_out=x_out if last == 0 else None, covariance=False, release=release)
    stats.remove()
    for key in stats.cov:  # Gram matrices: the diagonal shows any NaN/Inf (method/decompose.py)
        check_finite(stats.cov[key].diagonal(), f"{key} statistics")
    cov = stats.cov[stages[0].key].clone()
    layout = Layout(weights, stats.cov, stats.neuron_scores(), family, *layout_args)
    del stats, work
    staged = {n for g in stages for n in g.linears}
    with phase("factors"):
        fitted = {n: layout.fit(n, weights, storage) for n in family.linears if n not in staged}  # experts: plain
    for s, group in enumerate(stages):
        if s:
            with phase("paired statistics"):
                work = _partial(meta_block, weights, fitted, device)
                begin_pass()
                cov, cross = paired_pass(orig, work, group.linears[0], x, xh, kwargs, device, batch,
                                         x_out=x_out if s == last else None, release=release)
                del work
            split = layout.splits.get(group.linears[0])
            if split and split[0] == "in":  # the split rows layers hand their neurons over prime first
                back = torch.argsort(torch.cat([split[1], split[2]])).to(cov.device)
                cov, cross = submatrix(cov, back), cross[:, back]
        check_finite(cov.diagonal(), f"{group.key} statistics (compensated)")
        cross = local_and_cumulative(cov, cross)  # once per group, in place
        for name in group.linears:
            with phase("factors"):
                fitted[name] = layout.fit(name, weights, storage, cov=cov, cross=cross)
        del cov, cross
    return layout.result(weights, fitted)


def _partial(meta_block: nn.Module, weights: dict, fitted: dict, device) -> nn.Module:
    """The block with the layers fitted so far compressed, the rest original."""
    tensors = {k: v for k, v in weights.items() if k.rsplit(".", 1)[0] not in fitted}
    for own, _, _ in fitted.values():
        tensors.update(own)
    return build_block(meta_block, tensors, {n: spec for n, (_, spec, _) in fitted.items()}, device, torch.float32)

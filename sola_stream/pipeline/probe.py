"""What one unit of a layer's whitened error costs the whole model, measured by a survey pass.

The allocation trades parameters between layers by the output error each rank removes (the
whitened energies, method/decompose.py). Those errors are exact for the layer itself but say
nothing about what the model's predictions lose: a key projection's error moves attention
patterns, the first block's MLP error is amplified by every block after it. The probe measures
it. During the survey (which runs the original blocks in order), a few windows (drawn beside the
calibration windows, never in the statistics: the cuts are judged mostly on data they were not
fitted to; drawn at random offsets into the same text, a window may share some tokens with them) are
also run through each block with one layer cut to half its parameters (rank by its own whitened
spectrum); the resulting perturbation of the block's output is carried, as a difference from the
clean states, through every later original block; at the end, the KL divergence of the model's
next-token distribution from the clean one is divided by the whitened energy the cut dropped.
That ratio is the layer's `importance`: a rank's gain in the allocation is its energy times it.
Measured on SmolLM2 at 20% (quick protocol): perplexity 36.8 against 38.3 with the block-update
heuristic it replaces (docs/BENCHMARKS.md). Second-order behaviour (KL grows with the square of a small
perturbation, i.e. with the dropped energy) is what lets one cut stand for every rank.

The KL is taken over each position's K most likely clean tokens (renormalized): the head is
applied to K rows per position instead of the whole vocabulary, which would otherwise cost more
than the probe's block forwards. Perturbations are kept as bfloat16 differences on the host:
(candidates x probe windows x seqlen x hidden) x 2 bytes, counted by the plan.
"""
from __future__ import annotations

import torch

from sola_stream.errors import InputError
from sola_stream.pipeline.block_forward import _to

KEEP = 0.5  # the probe's cut: half of the layer's factored parameters
TOP_K = 64  # clean next-token candidates the KL is taken over, per position
_TOKENS = 64  # positions per head chunk (64 x K head rows: 134 MB at hidden 8192)


class Probe:
    """Perturbation streams of every layer seen so far; `block()` per block in order, `finish()`
    after the last. `windows`: the probe windows' first-block inputs (p x T x H)."""

    def __init__(self, windows: torch.Tensor):
        self.clean = windows.detach().to("cpu", torch.float32, copy=True)
        self.deltas: dict[str, torch.Tensor] = {}  # "block:layer" -> bf16 difference from the clean states
        self.dropped: dict[str, float] = {}

    @torch.no_grad()
    def block(self, i: int, block, layout, weights: dict[str, torch.Tensor], kwargs: dict, device) -> None:
        """Carry every earlier perturbation through original block i, then add one per layer of
        `layout` (cut by Layout.truncated); the clean states move on to the block's outputs."""
        kw = {k: _to(v, device) for k, v in kwargs.items()}
        clean_out = _run(block, self.clean, kw, device, i)
        for key, delta in self.deltas.items():
            self.deltas[key] = (_run(block, self.clean + delta.float(), kw, device, i) - clean_out).to(torch.bfloat16)
        for c in layout.candidates:
            linear = block.get_submodule(c.name)
            original = linear.weight.data
            cut, dropped = layout.truncated(c.name, weights, KEEP)
            linear.weight.data = cut.to(original.device, original.dtype)
            try:
                out = _run(block, self.clean, kw, device, i)
            finally:
                linear.weight.data = original
            del cut  # before the next layer's factors are made (the plan counts one cut at a time)
            self.deltas[f"{i}:{c.name}"] = (out - clean_out).to(torch.bfloat16)
            self.dropped[f"{i}:{c.name}"] = dropped
        self.clean = clean_out

    @torch.no_grad()
    def finish(self, skeleton, device) -> dict[str, tuple[float, float, int]]:
        """Per layer: (KL summed over the probe positions, dropped energy, positions)."""
        head = skeleton.head_on(device)
        clean = self.clean.flatten(0, 1)
        chunks = []
        for s in range(0, clean.shape[0], _TOKENS):
            h = clean[s:s + _TOKENS].to(device)
            logits = head.logits(h)
            ids = logits.topk(min(TOP_K, logits.shape[-1]), dim=-1).indices
            chunks.append((s, h, ids, torch.log_softmax(head.logits_at(h, ids), -1)))
        out = {}
        for key, delta in self.deltas.items():
            flat, kl = delta.flatten(0, 1), 0.0
            for s, h, ids, clean_lp in chunks:  # the clean states moved to the device once, not per layer
                lp = torch.log_softmax(head.logits_at(h + flat[s:s + _TOKENS].to(device, torch.float32), ids), -1)
                kl += float((clean_lp.exp() * (clean_lp - lp)).sum())
            out[key] = (kl, self.dropped[key], clean.shape[0])
        return out


def importance(totals: dict[str, tuple[float, float, int]]) -> dict[str, float]:
    """KL per position per unit of dropped whitened energy, by layer ("block:layer" keys). A layer
    whose cut changed nothing at all is one no probe token reached (an expert the probe windows
    were not routed to): unknown, so it counts as its block's most important layer, not as free."""
    out = {k: (kl / n / dropped if dropped > 0 and n else 0.0) for k, (kl, dropped, n) in totals.items()}
    top: dict[str, float] = {}
    for k, v in out.items():
        block = k.split(":", 1)[0]
        top[block] = max(top.get(block, 0.0), v)
    return {k: (v if totals[k][0] > 0 else top[k.split(":", 1)[0]]) for k, v in out.items()}


def _run(block, states: torch.Tensor, kw: dict, device, i: int) -> torch.Tensor:
    out = []
    for w in range(states.shape[0]):  # one window at a time: the probe is a few windows
        o = block(states[w:w + 1].to(device, torch.float32), **kw)
        o = o[0] if isinstance(o, tuple) else o
        if not torch.isfinite(o).all():
            raise InputError(f"survey probe, block {i}: non-finite block output (NaN or Inf) for a probe window")
        out.append(o.to("cpu", torch.float32))
    return torch.cat(out)

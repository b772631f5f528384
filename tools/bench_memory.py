#!/usr/bin/env python
"""Peak memory and speed of compressing real-shaped blocks under a GPU cap (run on a GPU).

  python tools/bench_memory.py --config tools/configs/llama-2-70b.json --blocks 2 \\
      --nsamples 128 --seqlen 2048 --gpu-cap 24 --host-cap 32

1. writes a random-weight checkpoint with the config's shapes (tools/make_synthetic_checkpoint.py)
   unless it exists;
2. caps this process's GPU memory (torch.cuda.set_per_process_memory_fraction on a larger card);
3. predicts the run with the `plan` model, then compresses the checkpoint (SoLA, the CLI's
   defaults unless --ratio / --prime-ratio say otherwise), recording peak GPU memory (allocated and reserved), peak host RSS (psutil, sampled)
   and seconds per block (between successive block starts: statistics, decomposition,
   propagation and waiting for the background commit);
4. in the same process, measures the floor components of one block separately: reading its
   weights, the full forward pass, the covariance accumulation alone, the decompositions, and
   the forward pass of the compressed block. floor = forward + covariances + decompositions +
   compressed forward (reads and writes overlap with compute; the engine's statistics pass
   stops at the FFN output projection's input, so it can beat this floor);
5. prints one JSON object (appended to --results) with the figures, the plan's predictions and
   their errors, and an extrapolated whole-model time; the row is written before the floors are
   measured and again with them, so a run cut short still leaves its main figures.
Peak GPU memory is also kept per step (sola_stream.phases, the names the simulation uses:
tools/simulate_device_memory.py), as torch's allocated bytes (solver and cuBLAS workspaces are
allocated through torch's allocator, so they are in it; the CUDA context is not).
On a machine without CUDA it runs on the CPU (a smoke test; GPU fields are zero).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from make_synthetic_checkpoint import make_checkpoint  # noqa: E402

import sola_stream.pipeline.engine as engine  # noqa: E402
from sola_stream.storage.checkpoint import CheckpointReader  # noqa: E402
from sola_stream.method.block_compress import compress_block  # noqa: E402
from sola_stream.pipeline.memory import PeakMemory  # noqa: E402
from sola_stream.nn.build import build_block  # noqa: E402
from sola_stream.cli import prime_ratio_arg  # noqa: E402
from sola_stream.phases import listening  # noqa: E402
from sola_stream.pipeline.options import prime_options  # noqa: E402
from sola_stream.pipeline.plan import GIB, make_plan  # noqa: E402
from sola_stream.pipeline.skeleton import Skeleton  # noqa: E402
from sola_stream.pipeline.block_forward import BlockStats, run_block  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


class PhasePeaks:
    """Peak allocated CUDA bytes per step (innermost steps joined by " / ", as the simulation
    names them): the peak counter is read and reset at every step boundary."""

    def __init__(self, device: torch.device, log: Path | None = None):
        self.device, self.stack, self.peaks, self.reserved, self.log = device, [], {}, 0, log
        self.t0 = time.perf_counter()

    def __call__(self, name: str, entering: bool) -> None:
        key = " / ".join(self.stack) or "between steps"
        self.peaks[key] = max(self.peaks.get(key, 0), torch.cuda.max_memory_allocated(self.device))
        self.reserved = max(self.reserved, torch.cuda.max_memory_reserved(self.device))
        torch.cuda.reset_peak_memory_stats(self.device)
        self.stack.append(name) if entering else self.stack.pop()
        if self.log is not None:  # so that a run cut short leaves what it measured
            self.log.write_text(json.dumps({"seconds": round(time.perf_counter() - self.t0, 1), "at": key,
                                            "peak_gib": self.gib()}) + "\n")

    def gib(self) -> dict[str, float]:
        return {k: round(v / GIB, 2) for k, v in self.peaks.items()}


def covariance_time(covs: dict, tokens: int, chunk: int, device: torch.device) -> float:
    """X^T X accumulation alone for each statistic's width, over all calibration tokens."""
    total = 0.0
    for cov in covs.values():
        x = torch.randn(chunk, cov.shape[0], device=device)
        acc = torch.zeros_like(cov)

        def accumulate():
            for _ in range(max(1, tokens // chunk)):
                acc.addmm_(x.T, x)

        total += timed(accumulate, device)[1]
        del x, acc
    return total


def floors(model: Path, opts, device: torch.device, batch: int) -> dict:
    """Each compute component of block 0, measured alone on random calibration states."""
    reader = CheckpointReader(model)
    skeleton = Skeleton(reader)
    family = skeleton.family
    weights, t_read = timed(lambda: reader.tensors(family.block_prefix(0)), device)
    kwargs = skeleton.embed(torch.zeros(1, opts.seqlen, dtype=torch.long))[1][0]
    gen = torch.Generator().manual_seed(0)
    states = torch.randn(opts.nsamples, opts.seqlen, skeleton.hidden_size, generator=gen)
    block = build_block(skeleton.meta_block(0), weights, None, device, torch.float32)
    _, t_fwd = timed(lambda: run_block(block, states, kwargs, device, batch, out=None), device)
    stats = BlockStats(block, family, stop_early=True)  # as the engine runs it
    _, t_stats = timed(lambda: run_block(block, states, kwargs, device, batch, out=None), device)
    stats.remove()
    del block
    t_cov = covariance_time(stats.cov, opts.nsamples * opts.seqlen, batch * opts.seqlen, device)
    storage = weights[family.linears[0] + ".weight"].dtype
    result, t_dec = timed(lambda: compress_block(weights, stats.cov, stats.neuron_scores(), family, opts.method,
                                                 opts.ratio, opts.prime_ratio, storage), device)
    del stats
    cblock = build_block(skeleton.meta_block(0), result.tensors, result.specs, device, torch.float32)
    _, t_fwd_c = timed(lambda: run_block(cblock, states, kwargs, device, batch, out=None), device)
    comp = {"read_block": t_read, "forward": t_fwd, "covariances": t_cov, "decompositions": t_dec,
            "forward_compressed": t_fwd_c, "statistics_pass_as_run": t_stats}
    comp["floor"] = comp["forward"] + comp["covariances"] + comp["decompositions"] + comp["forward_compressed"]
    return {k: round(v, 2) for k, v in comp.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "tools/configs/llama-2-70b.json")
    p.add_argument("--blocks", type=int, default=3, help="blocks in the synthetic checkpoint (>= 2)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--prime-ratio", type=prime_ratio_arg, default=None, help="as compress's (default: auto)")
    p.add_argument("--gpu-cap", type=float, default=24.0, help="GiB of GPU memory this process may use")
    p.add_argument("--host-cap", type=float, default=32.0, help="host-memory budget in GiB")
    p.add_argument("--work", type=Path, default=ROOT / "runs/bench-memory")
    p.add_argument("--results", type=Path, default=ROOT / "runs/bench-memory/results.jsonl")
    p.add_argument("--no-floors", action="store_true")
    p.add_argument("--phases-log", type=Path, help="rewritten at every step with the peaks so far")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cap = int(args.gpu_cap * GIB)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), torch.cuda.current_device())
    model = args.work / f"synthetic-{args.config.stem}-{args.blocks}"
    if not (model / "config.json").is_file():
        make_checkpoint(args.config, args.blocks, model)
    out = args.work / f"out-{args.config.stem}-{args.blocks}"
    opts = engine.CompressOptions(ratio=args.ratio, nsamples=args.nsamples, seqlen=args.seqlen,
                                  max_gpu_memory=args.gpu_cap, max_host_memory=args.host_cap,
                                  **prime_options(args.prime_ratio))
    cfg = json.loads((model / "config.json").read_text())
    plan = make_plan(cfg, opts, device, measure=device.type == "cuda")
    print(plan.describe(), flush=True)

    starts: list[float] = []
    inner = engine._compress_one

    def recording(*a, **k):
        starts.append(time.perf_counter())
        return inner(*a, **k)

    engine._compress_one = recording
    phases = PhasePeaks(device, args.phases_log)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with PeakMemory() as mem, (listening(phases) if device.type == "cuda" else nullcontext()):
        summary = engine.compress(str(model), str(out), opts, progress=True, overwrite=True)
        end = time.perf_counter()
        if device.type == "cuda":
            phases("end", True)  # closes the last interval
    engine._compress_one = inner
    alloc, reserved = PeakMemory.peak_gpu()
    if device.type == "cuda":
        # the per-step resets hide the run's peaks from torch's counters
        alloc, reserved = max(alloc, *phases.peaks.values()), max(reserved, phases.reserved)
    steps = [b - a for a, b in zip(starts, starts[1:])] or [end - starts[0]]
    per_block = sum(steps) / len(steps)
    setup = summary.seconds - (end - starts[0])
    n_full = json.loads(args.config.read_text())["num_hidden_layers"]
    row = {"date": time.strftime("%Y-%m-%d"),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "prime_ratio": "auto" if opts.prime_choices else opts.prime_ratio, "config": args.config.stem,
           "blocks": args.blocks, "nsamples": args.nsamples, "seqlen": args.seqlen, "ratio": args.ratio, "gpu_cap_gib": args.gpu_cap, "host_cap_gib": args.host_cap,
           "batch_tokens": plan.batch_tokens, "states_on_disk": summary.states_on_disk,
           "peak_gpu_allocated_gib": round(alloc / GIB, 2), "peak_gpu_reserved_gib": round(reserved / GIB, 2),
           "peak_host_rss_gib": round(mem.peak_rss / GIB, 2), "seconds_per_block": round(per_block, 2),
           "block_seconds": [round(s, 2) for s in steps], "setup_seconds": round(setup, 1),
           "plan_peak_gpu_gib": round(plan.peak_device / GIB, 2) if device.type == "cuda" else 0,
           "plan_peak_host_gib": round(plan.peak_host / GIB, 2),
           # the setup (calibration, the model-wide survey) grows with the blocks: scaled with them
           "extrapolated_full_model_hours": round(n_full * (setup / args.blocks + per_block) / 3600, 2)}
    if device.type == "cuda" and reserved:
        row["plan_gpu_error"] = round(plan.peak_device / reserved - 1, 3)  # the plan counts allocated bytes:
        row["plan_gpu_error_allocated"] = round(plan.peak_device / alloc - 1, 3)  # reserved adds the cache's slack
        row["peak_gpu_allocated_gib_by_step"] = phases.gib()
        row["plan_gpu_gib_by_step"] = {k: round(v / GIB, 2) for k, v in plan.device_parts.items()
                                       if k.startswith("peak ")}
        row["plan_seconds_per_block"] = plan.seconds_per_block and round(plan.seconds_per_block, 1)
    row["plan_host_error"] = round(plan.peak_host / mem.peak_rss - 1, 3)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    if not args.no_floors:
        row["partial"] = True  # the same row follows with the floors
    with open(args.results, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    if not args.no_floors:
        del row["partial"]
        torch.cuda.empty_cache() if device.type == "cuda" else None
        row["floor"] = floors(model, opts, device, max(1, plan.batch_tokens // args.seqlen))
        row["per_block_over_floor"] = round(per_block / row["floor"]["floor"], 2)
        with open(args.results, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row))


if __name__ == "__main__":
    main()

"""Command line: argument parsing and printing only (the work is in engine/evaluate/inspect)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from . import __version__
from .calibration import DEFAULT_NSAMPLES, DEFAULT_SEED, DEFAULT_SEQLEN
from .errors import SolaError
from .stop import Interrupted

EPILOG = """exit codes: 0 done; 1 unexpected error (bug: please report with the traceback);
2 bad input or options (one-line message names the file, tensor or option);
75 stopped by SIGTERM/SIGINT at a safe point (run the same command again to resume);
130 stopped at once by a second signal (the last finished block still resumes)."""


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line too, like every other error (exit 2)."""

    def error(self, message):
        self.exit(2, f"sola-stream: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sola-stream", description=(
        "Training-free LLM compression with SoLA (soft activation sparsity + low-rank "
        "decomposition), one decoder block at a time."), epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"sola-stream {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log numeric fallbacks (damping) and details")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("compress", help="compress a checkpoint into a new directory",
                       description="Compress MODEL (checkpoint directory or hub id) into OUTPUT. Run the "
                       "same command again to resume an interrupted run.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("model", help="Hugging Face checkpoint directory (safetensors) or hub id")
    c.add_argument("output", help="output directory (must be new or empty)")
    _run_options(c)
    c.add_argument("--overwrite", action="store_true",
                   help="discard an unfinished or finished run of this tool in OUTPUT and start over")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")

    pl = sub.add_parser("plan", help="predict memory, disk and time of a compress run (reads config.json only)",
                        description="Dry run: predict peak GPU memory, peak host memory, disk use and time per "
                        "block for these options, from MODEL's config.json alone. Exits 2 when the budgets "
                        "cannot be met.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pl.add_argument("model", help="checkpoint directory, config.json file or hub id")
    _run_options(pl)
    pl.add_argument("--no-measure", action="store_true", help="skip the matmul benchmark behind the time estimate")
    pl.add_argument("--json", action="store_true", help="print one JSON object")

    e = sub.add_parser("eval", help="WikiText-2 style perplexity, streamed block by block",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("model", help="dense checkpoint or sola_stream output directory")
    e.add_argument("--text", default=None, help="evaluation text file, UTF-8 (default: the shipped WikiText-2 "
                   "test split)")
    e.add_argument("--seqlen", type=int, default=1024, help="tokens per window (non-overlapping)")
    e.add_argument("--max-windows", type=int, default=None, help="evaluate only the first K windows")
    e.add_argument("--device", default="auto", help="cpu, cuda or cuda:N")
    e.add_argument("--batch-tokens", type=int, default=None, help="tokens per forward chunk (default: CPU 1024, GPU 16384)")
    e.add_argument("--threads", type=int, default=None, help="CPU threads (default: what CPU affinity, cgroup "
                   "quota and SLURM_CPUS_PER_TASK allow)")
    e.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")

    i = sub.add_parser("inspect", help="show method, ratios and ranks of a compressed directory")
    i.add_argument("output", help="sola_stream output directory")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _run_options(c: argparse.ArgumentParser) -> None:
    c.add_argument("--ratio", type=float, default=0.2,
                   help="fraction of decoder-block linear weight parameters to remove")
    c.add_argument("--method", default="sola", choices=["sola", "svd-llm", "svd"],
                   help="sola: prime neurons + whitened SVD + adaptive ranks; svd-llm: whitened SVD, "
                        "uniform ranks; svd: plain truncated SVD, uniform ranks")
    c.add_argument("--prime-ratio", type=float, default=0.15,
                   help="fraction of FFN neurons kept dense (sola only)")
    c.add_argument("--calib", default=None, help="calibration text: file, folder of text files, "
                   "saved datasets folder, or hf:NAME[:CONFIG[:SPLIT]] (default: shipped WikiText-2 valid)")
    c.add_argument("--nsamples", type=int, default=DEFAULT_NSAMPLES, help="calibration windows")
    c.add_argument("--seqlen", type=int, default=DEFAULT_SEQLEN, help="tokens per calibration window")
    c.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed for the window offsets")
    c.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (auto: cuda when available)")
    c.add_argument("--propagate", default="compressed", choices=["compressed", "original"],
                   help="feed the next block the outputs of the compressed block or of the original one")
    c.add_argument("--max-gpu-memory", type=float, default=None, metavar="GIB",
                   help="GPU memory budget in GiB (default: the device's total memory)")
    c.add_argument("--max-host-memory", type=float, default=None, metavar="GIB",
                   help="host RAM budget in GiB (default: available RAM); the calibration cache spills to "
                        "memory-mapped files in OUTPUT when it does not fit")
    c.add_argument("--batch-tokens", type=int, default=None,
                   help="tokens per forward chunk (default: CPU 1024; GPU the largest that fits the budget)")
    c.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: what CPU affinity, cgroup quota and SLURM_CPUS_PER_TASK allow)")


def _options(args):
    from .engine import CompressOptions

    return CompressOptions(method=args.method, ratio=args.ratio, prime_ratio=args.prime_ratio, calib=args.calib,
                           nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, device=args.device,
                           propagate=args.propagate, batch_tokens=args.batch_tokens,
                           max_gpu_memory=args.max_gpu_memory, max_host_memory=args.max_host_memory,
                           threads=args.threads)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"compress": _compress, "plan": _plan, "eval": _eval, "inspect": _inspect}[args.command](args)
    except Interrupted as exc:  # a graceful stop is not an error
        print(f"sola-stream: stopped: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.exit_code
    except SolaError as exc:
        print(f"sola-stream: error: {' '.join(str(exc).split())}", file=sys.stderr)  # always one line
        return exc.exit_code
    except KeyboardInterrupt:
        print("sola-stream: interrupted; finished blocks are kept, run the same command to resume", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as exc:  # out of memory is a budget to set, not a bug
        if type(exc).__name__ == "OutOfMemoryError":
            what = "GPU memory; set --max-gpu-memory below what is free or lower --batch-tokens"
        elif isinstance(exc, MemoryError) or "can't allocate memory" in str(exc):
            what = ("host memory; set --max-host-memory below what is free (the calibration cache then spills "
                    "to disk) or lower --batch-tokens")
        else:
            raise
        print(f"sola-stream: error: out of {what}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _compress(args) -> int:
    from .engine import compress
    from .memory import PeakMemory, gib

    opts = _options(args)
    with PeakMemory() as mem:
        s = compress(args.model, args.output, opts, progress=not args.no_progress, overwrite=args.overwrite)
    alloc, reserved = PeakMemory.peak_gpu()
    resumed = f" (resumed at block {s.resumed_at})" if s.resumed_at else ""
    print(f"\nsola-stream compress: done in {s.seconds:.1f} s on {s.device}{resumed}")
    print(f"  method          {s.method} (prime ratio {opts.prime_ratio if s.method == 'sola' else 0})")
    print(f"  target ratio    {s.target_ratio:.4f} of block linear weights")
    print(f"  achieved ratio  {s.achieved_ratio_blocks:.4f} of block linear weights, "
          f"{s.achieved_ratio_model:.4f} of all model parameters")
    done = s.blocks - s.resumed_at
    print(f"  blocks          {s.blocks}" + (f", {s.seconds / done:.1f} s per block" if done else
                                             ", already complete (every file verified against its checksum)"))
    print(f"  threads         {s.threads}")
    print(f"  calibration     {opts.nsamples} x {opts.seqlen} tokens, cache "
          f"{'spilled to disk' if s.states_on_disk else 'in RAM'}")
    print(f"  peak memory     host RSS {gib(mem.peak_rss)}" +
          (f", GPU allocated {gib(alloc)} / reserved {gib(reserved)}" if alloc else ""))
    print(f"  output          {s.output}")
    return 0


def _plan(args) -> int:
    from .plan import available_host_memory, make_plan, read_config

    opts = _options(args)
    opts.validate(need_device=False)
    cfg = read_config(args.model)
    device = opts.plan_device()
    p = make_plan(cfg, opts, device, budget_host=None if opts.max_host_memory else available_host_memory(),
                  measure=not args.no_measure and (device.type == "cpu" or torch_cuda()))
    print(json.dumps(p.as_dict()) if args.json else p.describe())
    return 2 if p.problems else 0


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _eval(args) -> int:
    from .calibration import default_eval_path
    from .cpus import set_threads
    from .engine import CompressOptions
    from .errors import InputError
    from .evaluate import perplexity

    if args.seqlen < 2:
        raise InputError(f"--seqlen: {args.seqlen} is too short (at least 2 tokens: one predicts the next)")
    if args.max_windows is not None and args.max_windows < 1:
        raise InputError(f"--max-windows: {args.max_windows} is not positive")
    if args.batch_tokens is not None and args.batch_tokens < 1:
        raise InputError(f"--batch-tokens: {args.batch_tokens} is not positive")
    text = args.text or str(default_eval_path())
    device = CompressOptions(device=args.device, threads=args.threads)
    device.validate()
    set_threads(args.threads)
    r = perplexity(args.model, text, seqlen=args.seqlen, max_windows=args.max_windows,
                   device=device.resolved_device(), batch_tokens=args.batch_tokens, progress=not args.no_progress)
    print(f"perplexity {r.ppl:.4f} over {r.windows} windows x {r.seqlen} tokens ({r.tokens} predicted) "
          f"of {r.text} in {r.seconds:.1f} s")
    if args.json:
        print(json.dumps({"ppl": r.ppl, "nll": r.nll, "windows": r.windows, "seqlen": r.seqlen,
                          "tokens": r.tokens, "text": r.text, "model": args.model}))
    return 0


def _inspect(args) -> int:
    from .inspect import describe, summary_dict

    info = summary_dict(args.output)
    print(json.dumps(info) if args.json else describe(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line: argument parsing and printing only (the work is in engine/evaluate/inspect)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from sola_stream import __version__
from sola_stream.storage.calibration import DEFAULT_NSAMPLES, DEFAULT_SEED, DEFAULT_SEQLEN
from sola_stream.errors import InputError, SolaError
from sola_stream.pipeline.options import AUTO_CHOICES
from sola_stream.pipeline.stop import Interrupted

EPILOG = """exit codes: 0 done; 1 unexpected error (bug: please report with the traceback);
2 bad input or options (one-line message names the file, tensor or option);
75 stopped by SIGTERM/SIGINT at a safe point (run the same command again to resume);
130 stopped at once by a second signal (the last finished block still resumes)."""


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Each default shown once: appended only where the help text does not already state it and
    there is a value to show."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


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
                       formatter_class=_Help)
    c.add_argument("model", help="Hugging Face checkpoint directory (safetensors) or hub id")
    c.add_argument("output", help="output directory (must be new or empty)")
    _run_options(c)
    c.add_argument("--overwrite", action="store_true",
                   help="discard an unfinished or finished run of this tool in OUTPUT and start over")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")

    pl = sub.add_parser("plan", help="predict memory, disk and time of a compress run (reads config.json only)",
                        description="Dry run: predict peak GPU memory, peak host memory, disk use and time per "
                        "block for these options, from MODEL's config.json alone. Exits 2 when the budgets "
                        "cannot be met.", formatter_class=_Help)
    pl.add_argument("model", help="checkpoint directory, config.json file or hub id")
    _run_options(pl)
    pl.add_argument("--ranks", type=int, default=1, metavar="N",
                    help="plan one rank of a run of N processes (torchrun --nproc-per-node, times the nodes)")
    pl.add_argument("--ranks-per-node", type=int, default=None, metavar="M",
                    help="ranks sharing one node's host memory (default: all N)")
    pl.add_argument("--no-measure", action="store_true", help="skip the matmul benchmark behind the time estimate")
    pl.add_argument("--json", action="store_true", help="print one JSON object")

    e = sub.add_parser("eval", help="perplexity of a dense checkpoint or an output, streamed block by block",
                       description="Perplexity of MODEL (a dense checkpoint or a sola_stream output) on "
                       "non-overlapping windows of a text (default: the WikiText-2 test split shipped with "
                       "the package), computed layer by layer: all windows through block 0, then block 1, "
                       "... with one block in memory at a time, so a model larger than the device is scored "
                       "too.", formatter_class=_Help)
    e.add_argument("model", help="dense checkpoint or sola_stream output directory")
    e.add_argument("--text", default=None, help="evaluation text file, UTF-8 (default: the shipped WikiText-2 "
                   "test split)")
    e.add_argument("--seqlen", type=int, default=1024, help="tokens per window (non-overlapping)")
    e.add_argument("--max-windows", type=int, default=None, help="evaluate only the first K windows")
    e.add_argument("--device", default="auto", help="cpu, cuda or cuda:N")
    e.add_argument("--batch-tokens", type=int, default=None, help="tokens per forward chunk (default: CPU 1024, GPU 16384)")
    e.add_argument("--threads", type=int, default=None, help="CPU threads (default: what CPU affinity, cgroup "
                   "quota and SLURM_CPUS_PER_TASK allow)")
    e.add_argument("--tasks", default=None, metavar="T1,T2,...",
                   help="score zero-shot multiple-choice tasks instead of perplexity: piqa, arc_easy, "
                        "arc_challenge, hellaswag, winogrande, boolq, openbookqa, or all (lm-eval's prompts, "
                        "acc and acc_norm)")
    e.add_argument("--data", default=None, help="folder holding the tasks' JSON-lines files (required with --tasks)")
    e.add_argument("--limit", type=int, default=None, help="score only the first N documents of each task")
    e.add_argument("--max-host-memory", type=float, default=None, metavar="GIB",
                   help="host RAM budget for the zero-shot states (default: available RAM); beyond half of "
                        "it they go to memory-mapped temporary files")
    e.add_argument("--record", action="store_true",
                   help="append the result to the output's evaluation records and its model card (README.md)")
    e.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")

    lt = sub.add_parser("lmeval-tasks", help="write lm-evaluation-harness task configs for local zero-shot data",
                        description="Write into OUT the YAML task configs (<task>_local) for the seven zero-shot "
                        "sets read from the JSON-lines files in DATA, for `lm_eval --include_path OUT`.")
    lt.add_argument("data", help="folder holding the tasks' JSON-lines files")
    lt.add_argument("out", help="folder to write the task configs into")

    u = sub.add_parser("upgrade", help="make an output written by version 0.1 loadable by transformers alone",
                       description="Write modeling_sola.py into OUTPUT and point config.json's auto_map at it, "
                       "so that AutoModelForCausalLM.from_pretrained(OUTPUT, trust_remote_code=True) works; "
                       "tensors are not touched. Outputs of version 0.2 and later need nothing.")
    u.add_argument("output", help="sola_stream output directory")

    i = sub.add_parser("inspect", help="show method, ratios and ranks of a compressed directory",
                       description="Method, target and achieved ratios, and per block the rank (+ prime "
                       "neurons) of every layer of a sola_stream output, checked against the stored "
                       "tensors' shapes. Reads config.json and the shard headers only.")
    i.add_argument("output", help="sola_stream output directory")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.add_argument("--plot", default=None, metavar="FILE.png",
                   help="also draw, per block, the kept fraction and whitened error of each layer (needs matplotlib)")
    return p


def _run_options(c: argparse.ArgumentParser) -> None:
    c.add_argument("--ratio", type=_ratios, default=[0.2], metavar="R[,R...]",
                   help="fraction of parameters to remove (of the block linear weights, or of the whole "
                        "model with --ratio-of model); several, comma-separated, write one output per ratio "
                        "into OUTPUT/ratio-R, sharing the survey of --allocation global, and with "
                        "--propagate original each block's statistics pass too (default: 0.2)")
    c.add_argument("--ratio-of", default="blocks", choices=["blocks", "model"],
                   help="what --ratio counts: the decoder blocks' linear weights (the papers' definition) or "
                        "all parameters of the model (embeddings and head are kept, so the blocks lose more)")
    c.add_argument("--method", default="sola", choices=["sola", "svd-llm", "svd"],
                   help="sola: prime neurons + whitened SVD + adaptive ranks; svd-llm: whitened SVD, "
                        "uniform ranks; svd: plain truncated SVD, uniform ranks")
    c.add_argument("--prime-ratio", type=prime_ratio_arg, default=None, metavar="P|auto",
                   help="fraction of FFN neurons kept dense (sola only), or auto: each block is fitted at "
                        "splits " + ", ".join(map(str, AUTO_CHOICES)) + " within its budget and keeps the "
                        "one whose output is closest to the original block's (default: auto; 0.25 with "
                        "--fit compensate; docs/METHOD.md)")
    c.add_argument("--calib", default=None, help="calibration text: file, folder of text files, "
                   "saved datasets folder, or hf:NAME[:CONFIG[:SPLIT]] (default: shipped WikiText-2 valid)")
    c.add_argument("--nsamples", type=int, default=DEFAULT_NSAMPLES, help="calibration windows")
    c.add_argument("--seqlen", type=int, default=DEFAULT_SEQLEN, help="tokens per calibration window")
    c.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed for the window offsets")
    c.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (auto: cuda when available)")
    c.add_argument("--propagate", default="compressed", choices=["compressed", "original"],
                   help="feed the next block the outputs of the compressed block or of the original one")
    c.add_argument("--allocation", default="global", choices=["global", "block"],
                   help="global: a survey pass over all blocks first, so blocks trade parameters (better "
                        "perplexity, 1.7x the time); block: every block keeps the same fraction, one pass "
                        "(sola only; the baselines use uniform ranks; docs/METHOD.md)")
    c.add_argument("--probe-windows", type=int, default=1, metavar="N",
                   help="windows (drawn beside the calibration windows, not used for the statistics) that the "
                        "survey of --allocation global runs with each layer cut, to measure what its error "
                        "costs the model's predictions; 0: a cheaper heuristic, "
                        "worse perplexity (default: 1; docs/METHOD.md)")
    c.add_argument("--fit", default="plain", choices=["plain", "compensate"],
                   help="plain: fit each layer to its own inputs (the published methods); compensate: fit "
                        "each layer so that, fed the inputs the compressed model produces, it reproduces "
                        "the original model's outputs (docs/METHOD.md; keeps a second calibration cache)")
    c.add_argument("--max-gpu-memory", type=float, default=None, metavar="GIB",
                   help="GPU memory budget in GiB (default: the device's total memory)")
    c.add_argument("--max-host-memory", type=float, default=None, metavar="GIB",
                   help="host RAM budget in GiB (default: available RAM); the calibration cache spills to "
                        "memory-mapped files in OUTPUT when it does not fit")
    c.add_argument("--batch-tokens", type=int, default=None,
                   help="tokens per forward chunk (default: CPU 1024; GPU the largest that fits the budget)")
    c.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: what CPU affinity, cgroup quota and SLURM_CPUS_PER_TASK allow)")


def _ratios(text: str) -> list[float]:
    try:
        ratios = [float(r) for r in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a comma-separated list of numbers") from None
    if len(set(ratios)) != len(ratios):
        raise argparse.ArgumentTypeError(f"{text!r} repeats a ratio")
    return ratios


def prime_ratio_arg(text: str) -> float | str:
    """--prime-ratio's argparse type (also tools/simulate_device_memory.py's): a number or auto."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or auto") from None


def _options(args, ratio: float | None = None):
    from sola_stream.pipeline.engine import CompressOptions
    from sola_stream.pipeline.options import prime_options

    return CompressOptions(method=args.method, ratio=args.ratio[0] if ratio is None else ratio, ratio_of=args.ratio_of,
                           **prime_options(args.prime_ratio, args.fit), calib=args.calib,
                           nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, device=args.device,
                           propagate=args.propagate, fit=args.fit,
                           allocation=args.allocation, probe_windows=args.probe_windows,
                           batch_tokens=args.batch_tokens,
                           max_gpu_memory=args.max_gpu_memory, max_host_memory=args.max_host_memory,
                           threads=args.threads)


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not as a warning at interpreter exit
        return code
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: flush while a pipe error can be handled
        sys.stdout.flush()
        raise exc
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"compress": _compress, "plan": _plan, "eval": _eval, "inspect": _inspect,
                "upgrade": _upgrade, "lmeval-tasks": _lmeval_tasks}[args.command](args)
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


def _compress(args) -> int:
    from sola_stream.pipeline import lockstep
    from sola_stream.pipeline.distributed import Ranks
    from sola_stream.pipeline.engine import compress
    from sola_stream.pipeline.memory import PeakMemory

    shared: dict = {}
    runs = [_options(args, ratio) for ratio in args.ratio]
    for opts in runs:  # every ratio checked before the first output is written
        opts.validate(need_device=False)
    ranks = Ranks.from_env()  # several processes under torchrun (docs/CLUSTER.md)
    if ranks.active:
        ranks.init(runs[0].resolved_device().type)
    outs = [args.output if len(args.ratio) == 1 else str(Path(args.output) / f"ratio-{ratio:g}") for ratio in args.ratio]
    try:
        if lockstep.applies(runs, ranks):  # one statistics pass per block feeds every ratio
            with PeakMemory() as mem:
                summaries = lockstep.compress_lockstep(args.model, outs, runs, progress=not args.no_progress,
                                                       overwrite=args.overwrite, shared=shared)
            for s, opts in zip(summaries, runs):
                _report(s, opts, mem)
            return 0
        for out, opts in zip(outs, runs):
            with PeakMemory() as mem:  # the whole call (tokenization included); GPU peaks come from the engine
                s = compress(args.model, out, opts, progress=not args.no_progress, overwrite=args.overwrite,
                             shared=shared, ranks=ranks)
            if ranks.rank == 0:
                _report(s, opts, mem)
    finally:
        ranks.close()
    return 0


def _report(s, opts, mem) -> None:
    from sola_stream.pipeline.memory import gib

    resumed = f" (resumed at block {s.resumed_at})" if s.resumed_at else ""
    print(f"\nsola-stream compress: done in {s.seconds:.1f} s on {s.device}{resumed}")
    prime = ("auto, per block among " + ", ".join(map(str, opts.prime_choices)) if opts.prime_choices else
             opts.prime_ratio if s.method == "sola" else 0)
    print(f"  method          {s.method} (prime ratio {prime})")
    if opts.ratio_of == "model":
        print(f"  target ratio    {opts.ratio:.4f} of all model parameters ({s.target_ratio:.4f} of block "
              "linear weights)")
    else:
        print(f"  target ratio    {s.target_ratio:.4f} of block linear weights")
    print(f"  achieved ratio  {s.achieved_ratio_blocks:.4f} of block linear weights, "
          f"{s.achieved_ratio_model:.4f} of all model parameters")
    done = s.blocks - s.resumed_at
    print(f"  blocks          {s.blocks}" + (f", {s.seconds / done:.1f} s per block" if done else
                                             ", already complete (every file verified against its checksum)"))
    print(f"  threads         {s.threads}")
    print(f"  calibration     {opts.nsamples} x {opts.seqlen} tokens, cache "
          f"{'spilled to disk' if s.states_on_disk else 'in RAM'}")
    print(f"  peak memory     host RSS {gib(max(mem.peak_rss, s.peak_rss))}" +
          (f", GPU allocated {gib(s.peak_gpu)}" if s.peak_gpu else ""))
    print(f"  output          {s.output}")


def _plan(args) -> int:
    from sola_stream.pipeline.plan import available_host_memory, make_plan
    from sola_stream.storage.checkpoint import read_config
    from sola_stream.families import family_for_dict
    from sola_stream.storage.input_checks import check_config

    if len(args.ratio) > 1:
        raise InputError("plan: give one --ratio (each ratio of a multi-ratio run is planned alike)")
    opts = _options(args)
    opts.validate(need_device=False)
    cfg, where = read_config(args.model)
    check_config(family_for_dict(cfg, str(where)).text(cfg, str(where)), str(where))
    device = opts.plan_device()
    per_node = args.ranks if args.ranks_per_node is None else args.ranks_per_node
    if args.ranks < 1 or not 1 <= per_node <= args.ranks:
        raise InputError(f"--ranks {args.ranks} --ranks-per-node {per_node}: need 1 <= ranks-per-node <= ranks")
    if opts.nsamples < args.ranks:
        raise InputError(f"--nsamples {opts.nsamples}: fewer calibration windows than the {args.ranks} ranks")
    if args.ranks > 1 and opts.fit == "compensate":
        raise InputError("--fit compensate runs in one process only: it is not yet spread over ranks")
    p = make_plan(cfg, opts, device, budget_host=None if opts.max_host_memory else available_host_memory(),
                  measure=not args.no_measure and (device.type == "cpu" or torch_cuda()),
                  ranks=args.ranks, ranks_per_node=per_node)
    print(json.dumps(p.as_dict()) if args.json else p.describe())
    return 2 if p.problems else 0


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _eval(args) -> int:
    if args.tasks is not None:
        return _zero_shot(args)
    from sola_stream.evaluation.perplexity import perplexity

    r = perplexity(args.model, args.text, seqlen=args.seqlen, max_windows=args.max_windows, device=args.device,
                   batch_tokens=args.batch_tokens, progress=not args.no_progress, threads=args.threads)
    print(f"perplexity {r.ppl:.4f} over {r.windows} windows x {r.seqlen} tokens ({r.tokens} predicted) "
          f"of {r.text} in {r.seconds:.1f} s")
    result = {"ppl": r.ppl, "nll": r.nll, "windows": r.windows, "seqlen": r.seqlen, "tokens": r.tokens,
              "text": r.text}
    if args.record:
        from sola_stream.storage.card import record

        record(args.model, {"kind": "perplexity", **result, "text": Path(r.text).name})
    if args.json:
        print(json.dumps({**result, "model": args.model}))
    return 0


def _zero_shot(args) -> int:
    from sola_stream.errors import InputError
    from sola_stream.evaluation.tasks import parse_tasks
    from sola_stream.evaluation.zeroshot import zero_shot

    tasks = parse_tasks(args.tasks)
    if not args.data:
        raise InputError("--data: the folder with the tasks' JSON-lines files is required with --tasks")
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit: {args.limit} is not positive")
    if args.max_host_memory is not None and not args.max_host_memory > 0:
        raise InputError(f"--max-host-memory: {args.max_host_memory} GiB is not a positive number")
    r = zero_shot(args.model, tasks, args.data, limit=args.limit, device=args.device, batch_tokens=args.batch_tokens,
                  max_host_memory=args.max_host_memory, threads=args.threads, progress=not args.no_progress)
    print(f"{'task':<15} {'acc':>7} {'acc_norm':>9} {'n':>6}")
    for name, t in r.tasks.items():
        print(f"{name:<15} {t.acc:>7.4f} {t.acc_norm:>9.4f} {t.n:>6}")
    print(f"{'mean':<15} {r.mean_acc:>7.4f} {r.mean_acc_norm:>9.4f}   ({r.requests} requests, {r.tokens} tokens, "
          f"{r.seconds:.1f} s{', states spilled to disk' if r.spilled else ''})")
    if args.record:
        from sola_stream.storage.card import record

        record(args.model, {"kind": "zero-shot", "limit": args.limit, **r.as_dict()})
    if args.json:
        print(json.dumps({**r.as_dict(), "model": args.model, "limit": args.limit}))
    return 0


def _lmeval_tasks(args) -> int:
    from sola_stream.evaluation.lmeval_tasks import write_tasks

    names = write_tasks(args.data, args.out)
    print(f"wrote {len(names)} task configs to {args.out}: lm_eval --model hf --model_args "
          f"pretrained=OUTPUT,trust_remote_code=True --include_path {args.out} --tasks {','.join(names)}")
    return 0


def _upgrade(args) -> int:
    from sola_stream.pipeline.upgrade import upgrade

    print(upgrade(args.output))
    return 0


def _inspect(args) -> int:
    from sola_stream.evaluation.report import describe, plot, summary_dict

    info = summary_dict(args.output)
    if args.plot:
        plot(info, args.plot)
    print(json.dumps(info) if args.json else describe(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())

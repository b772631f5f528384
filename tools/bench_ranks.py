"""Data-parallel compression, measured: one process against N ranks (torchrun) on the same model.

    python tools/bench_ranks.py --model models/smollm2-135m --out runs/ranks [--ranks 2] [--device cpu]
        [--nsamples 32 --seqlen 512] [--eval-windows 16] [--json FILE] [-- extra compress options]

Each run is `sola-stream compress` as users start it (the N-rank one under
`python -m torch.distributed.run --nproc-per-node N`), timed as a whole and per step (the
engine's phases: statistics, decomposition, propagation, survey); the two outputs are compared
(layer ranks, each layer's effective weight, perplexity on --eval-windows windows of the shipped
WikiText-2 test text). Then a projection for more ranks from the measured parts: windows split
(statistics, propagation, survey), decompositions shared by cost (the largest rank's share, from
the model's layer shapes), the rest serial. On one machine's CPU cores, N ranks divide the cores:
the figure that matters is how close N ranks come to one process using all of them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("survey", "statistics", "decomposition", "propagation", "survey spectra")


def worker(args, extra: list[str]) -> None:
    """One rank (or the single process): compress with the step timer listening."""
    from sola_stream.cli import _options, build_parser
    from sola_stream.phases import listening
    from sola_stream.pipeline.distributed import Ranks
    from sola_stream.pipeline.engine import compress

    cli = build_parser().parse_args(["compress", args.model, args.out, "--nsamples", str(args.nsamples),
                                     "--seqlen", str(args.seqlen), "--device", args.device, *extra])
    ranks = Ranks.from_env()
    if ranks.active:
        ranks.init(_options(cli).resolved_device().type)
    spent: dict[str, float] = defaultdict(float)
    started: dict[str, float] = {}

    def timer(name: str, entering: bool) -> None:
        if name in ("whitening", "spectra") and "survey" in started:
            name = "survey spectra"  # the survey's share of decompositions (spread too)
        elif name not in STEPS:
            return
        if entering:
            started[name] = time.perf_counter()
        else:
            spent[name] += time.perf_counter() - started.pop(name)

    t0 = time.perf_counter()
    with listening(timer):
        compress(args.model, args.out, _options(cli), progress=False, overwrite=True, ranks=ranks)
    wall = time.perf_counter() - t0
    Path(f"{args.timings}.rank{ranks.rank}").write_text(json.dumps({"wall": wall, "steps": spent}))
    ranks.close()


def effective(out: Path) -> dict:
    """Every compressed layer's weight as it acts (A B for factors): factor signs and the order of
    float sums may differ between runs that compute the same thing."""
    from safetensors.torch import load_file

    got = {}
    for f in sorted(out.glob("model-*.safetensors")):
        t = load_file(f)
        for k, v in t.items():
            if k.endswith("lowrank.a"):
                got[k[:-len(".lowrank.a")]] = v.float() @ t[k[:-1] + "b"].float()
            elif not k.endswith("lowrank.b"):
                got[k] = v.float()
    return got


def largest_share(model: Path, ranks: int) -> float:
    """The largest rank's fraction of one block's decomposition cost (the plan's figure)."""
    from sola_stream.pipeline.plan import Shapes, largest_decomposition_share, marginal_neurons

    shapes = Shapes.from_config(json.loads((model / "config.json").read_text()))
    return largest_decomposition_share(shapes, marginal_neurons(shapes, "sola", 0.25), ranks)


def run(args, extra: list[str]) -> dict:
    me = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", args.model, "--nsamples",
          str(args.nsamples), "--seqlen", str(args.seqlen), "--device", args.device]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    out = Path(args.out)
    results = {}
    for n in (1, args.ranks):
        target = out / f"ranks-{n}"
        timings = out / f"timings-{n}.json"
        launcher = [] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n)]
        cmd = (me if n == 1 else launcher + me[1:]) + ["--out", str(target), "--timings", str(timings), "--", *extra]
        print(f"== {n} process(es): {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True)
        total = time.perf_counter() - t0
        ranks = [json.loads(Path(f"{timings}.rank{r}").read_text()) for r in range(n)]
        results[n] = {"command_seconds": round(total, 2), "compress_seconds": round(max(r["wall"] for r in ranks), 2),
                      "steps": {k: round(max(r["steps"].get(k, 0.0) for r in ranks), 2) for k in STEPS}}
        print(json.dumps(results[n]), flush=True)
    return results


def compare(args) -> dict:
    out = Path(args.out)
    a, b = out / "ranks-1", out / f"ranks-{args.ranks}"
    sa, sb = (json.loads((d / "config.json").read_text())["sola"] for d in (a, b))
    same = [x["layers"] == y["layers"] for x, y in zip(sa["blocks"], sb["blocks"])]
    ea, eb = effective(a), effective(b)
    worst = max(float((ea[k] - eb[k]).norm() / ea[k].norm()) for k in ea)
    found = {"blocks_with_identical_ranks": f"{sum(same)}/{len(same)}", "worst_relative_weight_difference": worst}
    if args.eval_windows:
        from sola_stream.evaluation.perplexity import perplexity

        for name, d in (("ppl_1", a), (f"ppl_{args.ranks}", b)):
            found[name] = perplexity(str(d), None, seqlen=args.seqlen, max_windows=args.eval_windows,
                                     device=args.device, progress=False).ppl
    return found


def project(args, measured: dict) -> dict:
    """Time for N ranks from the one-process parts: windows split, decompositions shared by cost."""
    one = measured[1]
    steps = one["steps"]
    decompositions = steps["decomposition"] + steps["survey spectra"]
    windows = steps["statistics"] + steps["propagation"] + steps["survey"] - steps["survey spectra"]
    serial = one["compress_seconds"] - windows - decompositions
    return {n: round(serial + windows / n + decompositions * largest_share(Path(args.model), n), 1)
            for n in (1, 2, 4, 8)}


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--json", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--timings", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args, extra)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    measured = run(args, extra)
    report = {"measured": measured, "comparison": compare(args), "projected_seconds": project(args, measured),
              "largest_decomposition_share": {n: round(largest_share(Path(args.model), n), 3) for n in (2, 4, 8)}}
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

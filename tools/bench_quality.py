#!/usr/bin/env python
"""WikiText-2 perplexity of a dense model and of its SoLA / SVD-LLM / SVD compressions.

Each run is `sola-stream compress` followed by `sola-stream eval --json` in a subprocess (the
same commands a user types), so peak RSS and time are per run. Results append to --results as
JSON lines; a table is printed at the end. Example (docs/BENCHMARKS.md):

  python tools/bench_quality.py --model models/smollm2-135m --ratios 0.2 0.3 --nsamples 64
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def run(cmd: list[str]) -> tuple[str, float, int]:
    """stdout, seconds and peak RSS (bytes, this child's own rusage via wait4) of one command."""
    import os
    import tempfile

    t0 = time.time()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        secs = time.time() - t0
        out.seek(0), err.seek(0)
        code = proc.returncode = os.waitstatus_to_exitcode(status)
        if code != 0:
            sys.exit(f"failed ({code}): {' '.join(cmd)}\n{err.read()[-3000:]}")
        return out.read(), secs, usage.ru_maxrss * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--text", default=str(Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/wiki.test.raw"))
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3])
    p.add_argument("--methods", nargs="+", default=["sola", "svd-llm", "svd"])
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=1024, help="calibration window length")
    p.add_argument("--eval-seqlen", type=int, default=1024)
    p.add_argument("--max-windows", type=int, default=64)
    p.add_argument("--propagate", default="compressed")
    p.add_argument("--prime-ratio", default=None, help="sola's prime ratio (default: the package's)")
    p.add_argument("--allocation", default=None, help="block or global (default: the package's)")
    p.add_argument("--fit", default=None, help="plain or compensate (default: the method's)")
    p.add_argument("--tag", default="", help="suffix of the output directories (ablation runs)")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--results", default="runs/bench/results.jsonl")
    p.add_argument("--skip-dense", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "sola_stream"]
    evalargs = ["--text", args.text, "--seqlen", str(args.eval_seqlen), "--max-windows", str(args.max_windows),
                "--json", "--no-progress"]
    rows = []
    jobs = ([] if args.skip_dense else [("dense", 0.0)]) + [(m, r) for r in args.ratios for m in args.methods]
    for method, ratio in jobs:
        row = {"method": method, "ratio": ratio, "nsamples": args.nsamples, "calib_seqlen": args.seqlen,
               "propagate": args.propagate}
        target = args.model
        if method != "dense":
            target = str(out / f"{method}-{ratio}-{args.nsamples}x{args.seqlen}-{args.propagate}{args.tag}")
            subprocess.run(["rm", "-rf", target], check=True)
            extra = [f"--{k.replace('_', '-')}={v}" for k in ("prime_ratio", "allocation", "fit")
                     if (v := getattr(args, k)) is not None and (method == "sola" or k != "prime_ratio")
                     and not (k == "allocation" and method != "sola")]
            _, secs, rss = run([*cli, "compress", args.model, target, "--method", method, "--ratio", str(ratio),
                                "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                                "--propagate", args.propagate, "--no-progress", *extra])
            sola = json.loads((Path(target) / "config.json").read_text())["sola"]
            row.update(prime_ratio="auto" if sola.get("prime_choices") else sola["prime_ratio"],
                       allocation=sola.get("allocation"), fit=sola.get("fit"))
            row.update(compress_seconds=round(secs, 1), compress_peak_rss_gib=round(rss / 2**30, 3),
                       achieved_ratio_blocks=round(sola["achieved_ratio_blocks"], 4),
                       achieved_ratio_model=round(sola["achieved_ratio_model"], 4))
        stdout, secs, _ = run([*cli, "eval", target, *evalargs])
        res = json.loads(stdout.strip().splitlines()[-1])
        row.update(ppl=round(res["ppl"], 3), windows=res["windows"], eval_seqlen=res["seqlen"],
                   eval_seconds=round(secs, 1))
        rows.append(row)
        with open(args.results, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""One line per supported family: a tiny random model compressed, reloaded through transformers
alone (trust_remote_code, in a process where sola_stream cannot be imported), generated from, and
scored streamed and in memory (docs/BENCHMARKS.md, "Families").

    python tools/bench_families.py [--method sola] [--ratio 0.2] [--families llama phi3 ...]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_synthetic_checkpoint import train_tokenizer  # noqa: E402
from tiny_models import ALL_FAMILIES, TINY, make_tiny  # noqa: E402

import sola_stream  # noqa: E402
from sola_stream.evaluation.perplexity import perplexity  # noqa: E402
from sola_stream.storage.calibration import default_calibration_path  # noqa: E402

IDS = [[5, 17, 42, 7, 99, 3]]
CHILD = r"""
import json, sys
sys.modules["sola_stream"] = None
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32)
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = m(ids).logits[0]
gen = m.generate(ids, max_new_tokens=8, do_sample=False)[0].tolist()
print(json.dumps({"class": type(m).__name__, "logits": logits.tolist(), "generated": gen}))
"""


def one(family: str, method: str, ratio: float, tokenizer, work: Path) -> str:
    t0 = time.time()
    model = make_tiny(family, work / family, tokenizer)
    out = work / f"{family}-out"
    summary = sola_stream.compress(model, out, ratio=ratio, method=method, nsamples=8, seqlen=64, progress=False)
    child = subprocess.run([sys.executable, "-c", CHILD, str(out), json.dumps(IDS)], capture_output=True, text=True)
    if child.returncode != 0:
        return f"| {family} | FAILED to load with transformers: {child.stderr.strip().splitlines()[-1]} |"
    report = json.loads(child.stdout.strip().splitlines()[-1])
    loaded = sola_stream.load(out)
    with torch.no_grad():
        ref = loaded(torch.tensor(IDS)).logits[0]
    diff = float((torch.tensor(report["logits"]) - ref).abs().max())
    text = default_calibration_path()
    streamed = perplexity(str(out), str(text), seqlen=64, max_windows=2, progress=False)
    return (f"| {family} | {report['class']} | {summary.achieved_ratio_blocks:.3f} | {diff:.1e} | "
            f"{len(report['generated']) - len(IDS[0])} | {streamed.ppl:.2f} | {time.time() - t0:.1f} s |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=list(ALL_FAMILIES))
    p.add_argument("--method", default="sola")
    p.add_argument("--ratio", type=float, default=0.2)
    args = p.parse_args()
    tokenizer = train_tokenizer(TINY["vocab_size"])
    print("| family | class loaded by transformers | achieved ratio (blocks) | max logit diff vs sola_stream.load "
          "| tokens generated | streamed perplexity | time |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for family in args.families:
            print(one(family, args.method, args.ratio, tokenizer, Path(work)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

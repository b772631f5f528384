#!/usr/bin/env python
"""Zero-shot table: the seven tasks scored by the streamed evaluator and by lm-evaluation-harness,
side by side, for a dense model and its compressed outputs (docs/BENCHMARKS.md).

    python tools/bench_zeroshot.py --data ../shared/data/zeroshot --limit 100 \\
        --models models/smollm2-135m runs/smol-sola-20 runs/smol-sola-30 runs/smol-svdllm-20

Prints a markdown table (acc / acc_norm per task, streamed | lm-eval) and, with --json FILE, saves
every number. lm-eval runs the outputs through transformers with trust_remote_code, in float32
(the streamed evaluator computes in float32 too).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from sola_stream.evaluation.lmeval_tasks import write_tasks
from sola_stream.evaluation.tasks import TASKS
from sola_stream.evaluation.zeroshot import zero_shot


def lm_eval_scores(model: str, tasks_dir: str, limit: int | None, batch_size: int, device: str) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    res = simple_evaluate(model="hf", model_args=f"pretrained={model},trust_remote_code=True,dtype=float32",
                          tasks=[f"{t}_local" for t in TASKS], limit=limit, batch_size=batch_size, device=device,
                          task_manager=TaskManager(include_path=tasks_dir))["results"]
    return {t: {"acc": res[f"{t}_local"]["acc,none"], "acc_norm": res[f"{t}_local"].get("acc_norm,none")}
            for t in TASKS}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder of the zero-shot JSON-lines files")
    p.add_argument("--models", nargs="+", required=True, help="dense checkpoints and/or sola_stream outputs")
    p.add_argument("--limit", type=int, default=100, help="first N documents of each task")
    p.add_argument("--batch-size", type=int, default=16, help="lm-eval batch size")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (both evaluators)")
    p.add_argument("--json", default=None, help="save all numbers to this file")
    args = p.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tasks_dir:
        write_tasks(args.data, tasks_dir)
        for model in args.models:
            t0 = time.time()
            ours = zero_shot(model, list(TASKS), args.data, limit=args.limit, device=args.device, progress=False)
            t1 = time.time()
            theirs = lm_eval_scores(model, tasks_dir, args.limit, args.batch_size, args.device)
            rows[model] = {"streamed": {k: vars(v) for k, v in ours.tasks.items()}, "lm_eval": theirs,
                           "seconds": {"streamed": t1 - t0, "lm_eval": time.time() - t1}}
            print(f"{model}: streamed {t1 - t0:.0f} s, lm-eval {time.time() - t1:.0f} s", file=sys.stderr)
            if args.json:  # after every model: a long run that is stopped keeps what it measured
                Path(args.json).write_text(json.dumps({"limit": args.limit, "rows": rows}, indent=2))
    # acc_norm where the harness reports it (not WinoGrande, BoolQ), for both evaluators alike
    normed = [t for t in TASKS if next(iter(rows.values()))["lm_eval"][t]["acc_norm"] is not None]
    print("| model (evaluator) | " + " | ".join(TASKS) + " | mean acc (7) | mean acc_norm "
          f"({len(normed)}) |")
    print("|---|" + "---|" * (len(TASKS) + 2))
    for model, r in rows.items():
        for who in ("streamed", "lm_eval"):
            cells = [f"{r[who][t]['acc']:.3f} / {r[who][t]['acc_norm']:.3f}" if t in normed
                     else f"{r[who][t]['acc']:.3f}" for t in TASKS]
            mean_acc = sum(r[who][t]["acc"] for t in TASKS) / len(TASKS)
            mean_norm = sum(r[who][t]["acc_norm"] for t in normed) / len(normed)
            print(f"| {Path(model).name} ({who}) | " + " | ".join(cells) + f" | {mean_acc:.4f} | {mean_norm:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"limit": args.limit, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

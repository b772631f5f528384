"""The model card (README.md) of an output, and the evaluation records it shows.

Written when a run finishes, from config.json's `sola` section: method, target and achieved
ratios with their definitions, calibration, how to load the model; then every evaluation that
`sola-stream eval OUTPUT --record` appended to `sola-stream-evals.jsonl`. The card is rewritten
from those two sources on each record, so it never needs editing by hand (the input model's own
card is not copied: it describes the dense model). Both files are this tool's, without a checksum
in the ownership marker, since recording changes them after the run.
"""
from __future__ import annotations

from pathlib import Path

from sola_stream import __version__
from sola_stream.storage.checkpoint import read_json_object
from sola_stream.storage.atomic import atomic_write_bytes
from sola_stream.errors import InputError
from sola_stream.storage.ownership import read_marker
from sola_stream.storage.runlog import RunLog, read_log

CARD = "README.md"
EVALS = "sola-stream-evals.jsonl"


def render(config: dict, evals: list[dict]) -> str:
    """The card's text: a function of config.json and the records only (not of where the output
    lies), so the same run gives the same bytes in any directory."""
    sola = config["sola"]
    cal = sola.get("calibration") or {}
    target = (f"{sola['target_ratio_model']:.4f} of all model parameters" if sola.get("target_ratio_model")
              else f"{sola['ratio']:.4f} of the block linear weights")
    choices = sola.get("prime_choices")
    prime = (f"{sola['prime_ratio']:.0%} of each FFN" if not choices else
             "per block the split among " + ", ".join(f"{c:.0%}" for c in choices) + " whose output is closest "
             "to the original block's")
    where = "model-wide" if sola.get("allocation") == "global" else "per block"
    method = {"sola": f"SoLA (prime neurons {prime} kept dense, whitened low-rank factors, ranks allocated {where})",
              "svd-llm": "SVD-LLM-style whitened SVD, uniform ranks", "svd": "plain truncated SVD, uniform ranks"}
    family = sola.get("base_model_type", config.get("model_type"))
    short = {"sola": "SoLA", "svd-llm": "SVD-LLM", "svd": "SVD"}.get(sola["method"], sola["method"])
    lines = ["---", "library_name: transformers", "tags:", "- sola-stream", "- compressed", "- low-rank", "---", "",
             f"# {family} compressed with {short}, ratio {sola['ratio']:g}", "",
             f"A {family} model compressed training-free with "
             f"sola-stream {sola.get('package_version', __version__)}.", "",
             "| | |", "|---|---|",
             f"| method | {method.get(sola['method'], sola['method'])} |",
             f"| target | remove {target} |",
             f"| achieved | {sola['achieved_ratio_blocks']:.4f} of the block linear weights, "
             f"{sola['achieved_ratio_model']:.4f} of all parameters |",
             f"| parameters | {sola['params']['model_kept']:,} of {sola['params']['model_dense']:,} |"
             if "params" in sola else "| parameters | |",
             f"| calibration | {cal.get('nsamples')} windows x {cal.get('seqlen')} tokens of {cal.get('source')}, "
             f"seed {cal.get('seed')} |",
             f"| states propagated through | the {sola.get('propagate', 'compressed')} blocks |",
             f"| fit, rank allocation | {sola.get('fit', 'plain')}, {sola.get('allocation', 'block')} |", "",
             "Ratios: the fraction of parameters removed, counted over the decoder blocks' linear weights (the "
             "papers' definition; embeddings, norms and head are kept) and over the whole model.", "",
             "## Load", "", "```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer",
             'model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)',
             'tokenizer = AutoTokenizer.from_pretrained("PATH", trust_remote_code=True)', "```", "",
             "The compressed layers are defined in `modeling_sola.py`, next to this card.", "",
             "## Evaluations", ""]
    if not evals:
        lines.append("None recorded yet (`sola-stream eval PATH --record`).")
    for e in evals:
        if e.get("kind") == "perplexity":
            lines.append(f"- {e['time']}: perplexity **{e['ppl']:.4f}** on {e['windows']} windows x {e['seqlen']} "
                         f"tokens of {e['text']}")
        elif e.get("kind") == "zero-shot":
            cells = ", ".join(f"{k} {v['acc']:.4f}/{v['acc_norm']:.4f}" for k, v in e["tasks"].items())
            lines.append(f"- {e['time']}: zero-shot acc/acc_norm (first {e.get('limit') or 'all'} documents "
                         f"per task): {cells}; mean acc_norm **{e['mean_acc_norm']:.4f}**")
    return "\n".join(lines) + "\n"


def write_card(out_dir: Path, config: dict) -> None:
    atomic_write_bytes(out_dir / CARD, render(config, read_log(out_dir, EVALS)).encode())


def record(out_dir: str, entry: dict) -> None:
    """Append an evaluation to a finished output's records and rewrite its card."""
    path = Path(out_dir)
    marker = read_marker(path) if path.is_dir() else None
    if not marker or not marker.get("complete"):
        raise InputError(f"{path}: --record needs a finished sola-stream output (it writes its model card)")
    config = read_json_object(path / "config.json", "config.json")
    RunLog(path, EVALS).write("eval", **entry)
    write_card(path, config)

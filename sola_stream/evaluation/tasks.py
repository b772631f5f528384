"""The seven zero-shot multiple-choice tasks of the compression papers, as lm-evaluation-harness
defines them (prompts, choices, gold answer, length normalization), read from local JSON lines.

Each document becomes one request per choice: a context and a continuation whose summed
log-likelihood scores the choice. `acc` takes the best sum, `acc_norm` the best sum divided by
the length in characters of the choice string (lm-eval's `doc_to_choice`; for WinoGrande the
choices are the two filled-in contexts). The data files are the Hugging Face datasets' field
layouts (see the data folder's README); nothing here downloads anything.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from sola_stream.errors import InputError

TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "openbookqa")
FILES = {"piqa": "piqa-valid.jsonl", "arc_easy": "ARC-Easy-test.jsonl", "arc_challenge": "ARC-Challenge-test.jsonl",
         "hellaswag": "hellaswag-validation.jsonl", "winogrande": "winogrande-xl-validation.jsonl",
         "boolq": "boolq-validation.jsonl", "openbookqa": "openbookqa-test.jsonl"}
PIQA_LABELS = "piqa-valid-labels.lst"


@dataclass
class Doc:
    contexts: list[str]  # one per choice (the same string for all but WinoGrande)
    continuations: list[str]  # one per choice, with lm-eval's " " target delimiter
    choices: list[str]  # what acc_norm divides by (their lengths in characters)
    gold: int


def _multiple_choice(context: str, choices: list[str], gold: int) -> Doc:
    return Doc([context] * len(choices), [" " + c for c in choices], list(choices), gold)


def _hellaswag_text(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _arc(d: dict) -> Doc:
    return _multiple_choice(f"Question: {d['question']}\nAnswer:", d["choices"]["text"],
                            d["choices"]["label"].index(d["answerKey"]))


def _hellaswag(d: dict) -> Doc:
    ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
    return _multiple_choice(_hellaswag_text(d["activity_label"] + ": " + ctx),
                            [_hellaswag_text(e) for e in d["endings"]], int(d["label"]))


def _winogrande(d: dict) -> Doc:
    idx = d["sentence"].index("_")
    contexts = [d["sentence"][:idx] + opt for opt in (d["option1"], d["option2"])]
    target = " " + d["sentence"][idx + 1:].strip()
    return Doc(contexts, [target, target], contexts, {"1": 0, "2": 1}[d["answer"]])


def _boolq(d: dict) -> Doc:
    return _multiple_choice(f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ["no", "yes"], int(bool(d["answer"])))


def _openbookqa(d: dict) -> Doc:
    return _multiple_choice(d["question_stem"], d["choices"]["text"], d["choices"]["label"].index(d["answerKey"].lstrip()))


def _piqa(d: dict) -> Doc:
    return _multiple_choice(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], d["label"])


BUILDERS = {"piqa": _piqa, "arc_easy": _arc, "arc_challenge": _arc, "hellaswag": _hellaswag,
            "winogrande": _winogrande, "boolq": _boolq, "openbookqa": _openbookqa}


def parse_tasks(spec: str) -> list[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if names == ["all"]:
        return list(TASKS)
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise InputError(f"--tasks: {unknown[0] if unknown else spec!r} is not a task "
                         f"(one or more of {', '.join(TASKS)}, or all)")
    return list(dict.fromkeys(names))


def read_jsonl(path: Path, limit: int | None) -> list[dict]:
    rows = []
    try:
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if limit is not None and len(rows) >= limit:
                    break
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError("not a JSON object")
                    rows.append(row)
    except FileNotFoundError:
        raise InputError(f"{path}: missing (the --data folder holds the zero-shot JSON-lines files)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: line {number}: unreadable ({exc})") from None
    return rows


def load_task(name: str, data: Path, limit: int | None = None) -> list[Doc]:
    """The first `limit` documents of task `name` from the folder `data`."""
    path = Path(data) / FILES[name]
    rows = read_jsonl(path, limit)
    if name == "piqa":
        labels = (Path(data) / PIQA_LABELS).read_text().split() if (Path(data) / PIQA_LABELS).is_file() else []
        if len(labels) < len(rows):
            raise InputError(f"{Path(data) / PIQA_LABELS}: missing or shorter than {path.name}")
        rows = [{**r, "label": int(labels[i])} for i, r in enumerate(rows)]
    docs = []
    for number, row in enumerate(rows, 1):
        try:
            docs.append(BUILDERS[name](row))
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
            raise InputError(f"{path}: line {number}: not a {name} document ({type(exc).__name__}: {exc})") from None
    if not docs:
        raise InputError(f"{path}: no documents")
    return docs

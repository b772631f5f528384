"""lm-evaluation-harness task configs for the seven zero-shot sets, reading local JSON lines.

`sola-stream lmeval-tasks DATA OUT` writes into OUT one YAML per task (named `<task>_local`, so
they never clash with the harness's own download-based tasks) and `sola_local_utils.py` with the
document processing they need, all pointing at the JSON-lines files in DATA. Then, offline:

    lm_eval --model hf --model_args pretrained=OUTPUT,trust_remote_code=True \\
            --include_path OUT --tasks piqa_local,arc_easy_local,...

The prompts, choices, targets and metrics are the harness's own definitions of these tasks
(the same as tasks.py, which `sola-stream eval --tasks` uses).
"""
from __future__ import annotations

import json
from pathlib import Path

from sola_stream.storage.atomic import atomic_write_bytes
from sola_stream.errors import InputError, OutputError
from sola_stream.evaluation.tasks import FILES, PIQA_LABELS, TASKS

ACC = "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
ACC_NORM = ACC.replace("metric: acc", "metric: acc_norm")

# per task: the harness's prompt fields and metrics (lm_eval/tasks/*/ *.yaml, version 0.4)
SPECS = {
    "piqa": dict(process="process_piqa", text='"Question: {{goal}}\\nAnswer:"', target="label",
                 choice='"{{[sol1, sol2]}}"', metrics=ACC + ACC_NORM),
    "arc_easy": dict(text='"Question: {{question}}\\nAnswer:"', target='"{{choices.label.index(answerKey)}}"',
                     choice='"{{choices.text}}"', metrics=ACC + ACC_NORM),
    "arc_challenge": dict(text='"Question: {{question}}\\nAnswer:"', target='"{{choices.label.index(answerKey)}}"',
                          choice='"{{choices.text}}"', metrics=ACC + ACC_NORM),
    "hellaswag": dict(process="process_hellaswag", text='"{{query}}"', target='"{{label}}"', choice='"choices"',
                      metrics=ACC + ACC_NORM),
    "winogrande": dict(text="!function sola_local_utils.winogrande_text",
                       target="!function sola_local_utils.winogrande_target",
                       choice="!function sola_local_utils.winogrande_choice", metrics=ACC),
    "boolq": dict(process="process_boolq", text='"{{passage}}\\nQuestion: {{question}}?\\nAnswer:"', target="label",
                  choice='["no", "yes"]', metrics=ACC),
    "openbookqa": dict(text="question_stem", target='"{{choices.label.index(answerKey.lstrip())}}"',
                       choice='"{{choices.text}}"', metrics=ACC + ACC_NORM),
}

UTILS = '''"""Document processing for the sola-stream *_local tasks (written by `sola-stream lmeval-tasks`)."""
import re
from pathlib import Path

PIQA_LABELS = Path({labels!r})


def process_piqa(dataset):
    labels = [int(x) for x in PIQA_LABELS.read_text().split()]
    return dataset.map(lambda doc, i: {{"label": labels[i]}}, with_indices=True)


def process_boolq(dataset):
    return dataset.map(lambda doc: {{"label": int(bool(doc["answer"]))}})


def _hellaswag_text(text):
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\\\[.*?\\\\]", "", text)
    return text.replace("  ", " ")


def process_hellaswag(dataset):
    def one(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {{"query": _hellaswag_text(doc["activity_label"] + ": " + ctx),
                "choices": [_hellaswag_text(e) for e in doc["endings"]], "label": int(doc["label"])}}
    return dataset.map(one)


def winogrande_text(doc):
    return {{"1": 0, "2": 1}}[doc["answer"]]


def winogrande_target(doc):
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def winogrande_choice(doc):
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]
'''


def task_yaml(name: str, data_file: Path) -> str:
    spec = SPECS[name]
    lines = [f"task: {name}_local", "dataset_path: json", "dataset_name: null", "dataset_kwargs:",
             "  data_files:", f"    test: {json.dumps(str(data_file))}", "output_type: multiple_choice",
             "test_split: test"]
    if "process" in spec:
        lines.append(f"process_docs: !function sola_local_utils.{spec['process']}")
    lines += [f"doc_to_text: {spec['text']}", f"doc_to_target: {spec['target']}",
              f"doc_to_choice: {spec['choice']}", "metric_list:"]
    return "\n".join(lines) + "\n" + spec["metrics"] + "metadata:\n  version: 1.0\n"


def write_tasks(data: str, out: str) -> list[str]:
    """The YAML files and the utils module in `out` for the data folder `data`; returns task names."""
    data_dir, out_dir = Path(data).resolve(), Path(out)
    for name in TASKS:
        if not (data_dir / FILES[name]).is_file():
            raise InputError(f"{data_dir / FILES[name]}: missing (DATA must hold the seven tasks' files)")
    if not (data_dir / PIQA_LABELS).is_file():
        raise InputError(f"{data_dir / PIQA_LABELS}: missing")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot create ({exc.strerror})") from None
    atomic_write_bytes(out_dir / "sola_local_utils.py", UTILS.format(labels=str(data_dir / PIQA_LABELS)).encode())
    for name in TASKS:
        atomic_write_bytes(out_dir / f"{name}_local.yaml", task_yaml(name, data_dir / FILES[name]).encode())
    return [f"{name}_local" for name in TASKS]

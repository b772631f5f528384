"""The Python API (sola_stream.compress / evaluate), --ratio-of model, help texts, and output
piped into a reader that goes away."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import sola_stream
from sola_stream.cli import build_parser, main
from sola_stream.errors import InputError

from conftest import CALIB_TEXT, make_tiny

SMALL = dict(nsamples=4, seqlen=32, progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tokenizer):
    return make_tiny("llama", tmp_path_factory.mktemp("api") / "tiny", tiny_tokenizer)


def test_python_api_compress_and_evaluate_match_the_cli(tiny, tmp_path, capsys):
    s = sola_stream.compress(tiny, tmp_path / "api", ratio=0.3, prime_ratio=0.1, calib=str(CALIB_TEXT), **SMALL)
    assert abs(s.achieved_ratio_blocks - 0.3) <= 0.005 and (tmp_path / "api" / "config.json").is_file()
    r = sola_stream.evaluate(tmp_path / "api", CALIB_TEXT, seqlen=64, max_windows=2, progress=False)
    assert main(["eval", str(tmp_path / "api"), "--text", str(CALIB_TEXT), "--seqlen", "64", "--max-windows", "2",
                 "--no-progress", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli["ppl"] == r.ppl and r.windows == 2 and r.ppl > 1
    with pytest.raises(InputError, match="--seqlen"):
        sola_stream.evaluate(tmp_path / "api", seqlen=1, progress=False)
    with pytest.raises(TypeError):
        sola_stream.compress(tiny, tmp_path / "x", ratios=0.2)  # a misspelt option is not ignored


def test_ratio_of_model_removes_that_share_of_all_parameters(tiny, tmp_path, capsys):
    assert main(["compress", str(tiny), str(tmp_path / "out"), "--ratio", "0.2", "--ratio-of", "model",
                 "--nsamples", "4", "--seqlen", "32", "--no-progress", "--calib", str(CALIB_TEXT)]) == 0
    stdout = capsys.readouterr().out
    sola = json.loads((tmp_path / "out" / "config.json").read_text())["sola"]
    assert abs(sola["achieved_ratio_model"] - 0.2) <= 0.005, sola["achieved_ratio_model"]
    assert sola["achieved_ratio_blocks"] > 0.21 and sola["target_ratio_model"] == 0.2
    assert "0.2000 of all model parameters" in stdout
    # the blocks hold ~85% of this model: removing 90% of it is impossible by compressing blocks
    code = main(["compress", str(tiny), str(tmp_path / "no"), "--ratio", "0.9", "--ratio-of", "model",
                 "--nsamples", "4", "--seqlen", "32", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("sola-stream: error: --ratio 0.9 --ratio-of model") and "\n" not in err
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("command", ["compress", "plan", "eval", "inspect", "upgrade"])
def test_help_states_each_default_once(command):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        text = (sub.formatter_class("x")._get_help_string(action) or "").replace("%(default)s", "VALUE")
        assert "(default: None)" not in text and "(default: False)" not in text, (command, action.dest, text)
        assert len(re.findall(r"default", text)) <= 1, (command, action.dest, text)
    assert len(sub.description or "") > 40, f"{command} --help says what it does"


@pytest.mark.parametrize("args", [["--help"], ["compress", "--help"], ["inspect", "NOWHERE"]])
def test_output_into_a_closed_pipe_is_not_an_error(args):
    p = subprocess.Popen([sys.executable, "-m", "sola_stream", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    p.stdout.close()  # the reader (`head`) is gone before anything is written
    err = p.stderr.read()
    code = p.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err
    assert code == (2 if args[0] == "inspect" else 0), (code, err)


def two_task_files(folder: Path) -> Path:
    """PIQA and BoolQ files of two documents each, in the layouts the evaluator reads."""
    folder.mkdir()
    piqa = [{"goal": "Keep a door open", "sol1": "Put a doorstop under it.", "sol2": "Put a spoon on it."},
            {"goal": "Cool a hot drink", "sol1": "Heat it in a pan.", "sol2": "Add an ice cube."}]
    boolq = [{"question": "is the sky blue", "passage": "On a clear day the sky looks blue.", "answer": True},
             {"question": "is ice hot", "passage": "Ice is frozen water.", "answer": False}]
    (folder / "piqa-valid.jsonl").write_text("".join(json.dumps(d) + "\n" for d in piqa))
    (folder / "piqa-valid-labels.lst").write_text("0\n1\n")
    (folder / "boolq-validation.jsonl").write_text("".join(json.dumps(d) + "\n" for d in boolq))
    return folder


def test_model_card_records_and_plot(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--nsamples", "4", "--seqlen", "32", "--no-progress", "--calib", str(CALIB_TEXT)]
    assert main(["compress", str(tiny), str(out), *common]) == 0
    card = (out / "README.md").read_text()
    assert "| method | SoLA" in card and "trust_remote_code=True" in card and "None recorded yet" in card
    assert main(["eval", str(out), "--text", str(CALIB_TEXT), "--seqlen", "64", "--max-windows", "2", "--record",
                 "--no-progress", "--json"]) == 0
    ppl = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"]
    assert main(["eval", str(out), "--tasks", "piqa,boolq", "--data", str(two_task_files(tmp_path / "tasks")), "--limit",
                 "2", "--record", "--no-progress"]) == 0
    card = (out / "README.md").read_text()
    assert f"perplexity **{ppl:.4f}**" in card and "zero-shot acc/acc_norm (first 2 documents" in card
    assert len((out / "sola-stream-evals.jsonl").read_text().splitlines()) == 2
    capsys.readouterr()
    # recording changed the card after the run: the finished output still verifies
    assert main(["compress", str(tiny), str(out), *common]) == 0 and "already complete" in capsys.readouterr().out

    assert main(["inspect", str(out), "--json", "--plot", str(tmp_path / "ranks.png")]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    gates = [b["mlp.gate_proj"] for b in info["blocks"]]  # a model-wide allocation may keep a block dense
    assert any(0 < g["kept"] < 1 for g in gates) and all(0 <= g["whitened_error"] < 1 for g in gates)
    assert (tmp_path / "ranks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert main(["eval", str(tiny), "--text", str(CALIB_TEXT), "--seqlen", "64", "--max-windows", "1", "--record",
                 "--no-progress"]) == 2  # a dense checkpoint has no card to record into
    assert "--record needs a finished sola-stream output" in capsys.readouterr().err
    assert main(["compress", str(tiny), str(out), *common, "--ratio", "0.3", "--overwrite"]) == 0
    assert "None recorded yet" in (out / "README.md").read_text()
    assert not (out / "sola-stream-evals.jsonl").exists()


def test_progress_bar_shows_the_planned_eta_before_the_first_block(tiny, tmp_path, capsys):
    assert main(["compress", str(tiny), str(tmp_path / "out"), "--nsamples", "4", "--seqlen", "32", "--calib",
                 str(CALIB_TEXT)]) == 0
    err = capsys.readouterr().err
    first = err.index("planned ETA")
    assert first < err.index("kept=")  # shown before the first block's own figures

"""Untrusted input through the CLI: damaged or hostile config.json, index and tensors, nonsense
options, links out of the model directory, read-only and full file systems, edited outputs.

Every refusal is exit code 2 with exactly one stderr line `sola-stream: error: ...` that names the
file, tensor or option, no traceback, the inputs unchanged (sha256) and no config.json in OUTPUT.
Real files only: real links, real mounts (tmpfs, as root), real tensors of the wrong dtype.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sola_stream
from sola_stream.storage.checkpoint import INDEX_NAME
from sola_stream.cli import main
from sola_stream.errors import InputError
from sola_stream.storage.output import MODELING_SOURCE
from sola_stream.storage.runlog import LOG_NAME

from conftest import ROOT, make_tiny
from test_bad_input import (FAST, PREFIX, assert_refused, compress, error_line, model, shard_of, shards,  # noqa: F401
                            small_calib, snapshot)

GIB = 2**30
IS_ROOT = os.geteuid() == 0


# -- helpers -----------------------------------------------------------------------------------
def cli(capsys, *argv) -> tuple[int, str, str]:
    """`sola-stream ARGV` in-process: (exit code, stdout, stderr). Usage errors leave argparse
    through SystemExit (the console script turns it into the same exit code)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def edit_json(path: Path, edit) -> None:
    """Rewrite the JSON file at `path` with `edit(obj)` (its return value, or obj edited in place)."""
    obj = json.loads(path.read_text())
    new = edit(obj)
    path.write_text(json.dumps(obj if new is None else new, indent=2))


def set_config(model_dir: Path, **fields) -> None:
    edit_json(model_dir / "config.json", lambda c: c.update(fields))


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, keyed by the path relative to it."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOG_NAME}


def temp_files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*.tmp")) if out.is_dir() else []


def replace_tensor(model_dir: Path, name: str, tensor: torch.Tensor | None, new_name: str | None = None) -> Path:
    """Rewrite the shard holding `name`: the tensor replaced by `tensor`, or removed (None); with
    `new_name`, `tensor` is added under that name instead. The index follows."""
    shard = shard_of(model_dir, name)
    tensors = load_file(str(shard))
    if new_name is not None:
        tensors[new_name] = tensor
    elif tensor is None:
        del tensors[name]
    else:
        tensors[name] = tensor
    save_file(tensors, str(shard), metadata={"format": "pt"})

    def fix(index):
        if new_name is not None:
            index["weight_map"][new_name] = shard.name
        elif tensor is None:
            del index["weight_map"][name]
    edit_json(model_dir / INDEX_NAME, fix)
    return shard


def sh(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True)


@contextmanager
def tmpfs(path: Path, options: str):
    """A real tmpfs mounted at `path` (root only); unmounted afterwards."""
    if not IS_ROOT:
        pytest.skip("mounting a tmpfs needs root")
    if not (shutil.which("mount") and shutil.which("umount")):
        pytest.skip("no mount/umount command")
    path.mkdir(parents=True, exist_ok=True)
    r = sh("mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path))
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
    try:
        yield path
    finally:
        if sh("umount", str(path)).returncode:
            sh("umount", "-l", str(path))


def remount(path: Path, options: str) -> None:
    r = sh("mount", "-o", f"remount,{options}", str(path))
    assert r.returncode == 0, r.stderr


# -- 1. config.json that is not a JSON object --------------------------------------------------
@pytest.mark.parametrize("text", ["[1, 2]", '"a string"', '{"model_type": "llama", "hidden_size": 64,'],
                         ids=["list", "string", "invalid"])
def test_config_not_an_object(model, tmp_path, compress, text):
    (model / "config.json").write_text(text)
    before = snapshot(model)
    out = tmp_path / "out"
    code, _, err = compress(model, out)
    assert_refused(code, err, before, (model,), out, str(model / "config.json"))
    assert not out.exists()


# -- 2. num_hidden_layers out of range, of the wrong type or disagreeing with the checkpoint ----
@pytest.mark.parametrize("layers", [0, 1_000_000_000, 2, 4, "3", 3.5, True, None],
                         ids=["zero", "billion", "fewer", "more", "string", "float", "bool", "null"])
def test_num_hidden_layers(model, tmp_path, compress, layers):
    set_config(model, num_hidden_layers=layers)
    before = snapshot(model)
    out = tmp_path / "out"
    t0 = time.monotonic()
    code, _, err = compress(model, out)
    assert time.monotonic() - t0 < 20, "a huge layer count must be refused before building anything"
    assert_refused(code, err, before, (model,), out, "config.json", "num_hidden_layers")
    assert not out.exists()


# -- 3. widths that disagree with the tensors --------------------------------------------------
@pytest.mark.parametrize("field,value", [("intermediate_size", 160), ("intermediate_size", 192),
                                         ("hidden_size", 32)])
def test_width_disagrees_with_tensors(model, tmp_path, compress, field, value):
    set_config(model, **{field: value})
    before = snapshot(model)
    out = tmp_path / "out"
    code, _, err = compress(model, out)
    line = assert_refused(code, err, before, (model,), out, "shape")
    assert "tensor 'model." in line, f"no tensor named: {line}"
    assert not out.exists()


# -- 4. a block tensor missing, or one too many ------------------------------------------------
def test_block_tensor_missing(model, tmp_path, compress):
    name = "model.layers.1.mlp.up_proj.weight"
    replace_tensor(model, name, None)
    before = snapshot(model)
    out = tmp_path / "out"
    code, _, err = compress(model, out)
    assert_refused(code, err, before, (model,), out, name, "missing")
    assert not out.exists()


def test_block_tensor_unexpected(model, tmp_path, compress):
    extra = "model.layers.1.mlp.extra_proj.weight"
    replace_tensor(model, "model.layers.1.mlp.up_proj.weight", torch.zeros(8, 64, dtype=torch.bfloat16), extra)
    before = snapshot(model)
    out = tmp_path / "out"
    code, _, err = compress(model, out)
    assert_refused(code, err, before, (model,), out, extra)
    assert not out.exists()


# -- 5. tensors that are not float -------------------------------------------------------------
@pytest.mark.parametrize("dtype,names", [(torch.int8, ("I8", "int8")), (torch.bool, ("BOOL", "bool")),
                                         (torch.float8_e4m3fn, ("F8_E4M3", "float8_e4m3fn"))],
                         ids=["int8", "bool", "float8_e4m3fn"])
def test_non_float_weight(model, tmp_path, compress, dtype, names):
    name = "model.layers.1.mlp.up_proj.weight"
    t = load_file(str(shard_of(model, name)))[name]
    shard = replace_tensor(model, name, (t > 0) if dtype == torch.bool else t.float().clamp(-100, 100).to(dtype))
    before = snapshot(model)
    out = tmp_path / "out"
    code, _, err = compress(model, out)
    line = assert_refused(code, err, before, (model,), out, name, shard.name)
    assert any(n in line for n in names), f"dtype not named: {line}"
    assert not out.exists()


# -- 6. nonsense options -----------------------------------------------------------------------
@pytest.mark.parametrize("option,value", [
    ("--max-host-memory", "nan"), ("--max-host-memory", "inf"), ("--max-gpu-memory", "-1"),
    ("--seed", str(2**64)), ("--seed", "-1"), ("--threads", "0"), ("--ratio", "nan"), ("--nsamples", "0"),
    ("--bogus", None), ("--ratio", "abc")])
def test_bad_option(model, tmp_path, capsys, small_calib, option, value):
    before = snapshot(model, small_calib)
    out = tmp_path / "out"
    args = [option] if value is None else [option, value]
    code, _, err = cli(capsys, "compress", model, out, *FAST, "--calib", small_calib, *args)
    line = assert_refused(code, err, before, (model, small_calib), out, option)
    if value is not None and value.isalpha():
        assert value in line, line
    assert not out.exists(), "output directory created for a rejected option"


# -- 7. an index that points out of the model directory or is not what it should be ------------
def _outside_copy(model_dir: Path, tmp_path: Path, name: str) -> Path:
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(shard_of(model_dir, name), outside)
    return outside


@pytest.mark.parametrize("how", ["parent", "absolute", "nested-parent"])
def test_index_shard_outside_model_dir(model, tmp_path, compress, how):
    name = "model.norm.weight"
    outside = _outside_copy(model, tmp_path, name)
    shard = {"parent": "../outside.safetensors", "absolute": str(outside),
             "nested-parent": "sub/../../outside.safetensors"}[how]
    edit_json(model / INDEX_NAME, lambda i: i["weight_map"].__setitem__(name, shard))
    before = snapshot(model, outside)
    out = tmp_path / "out"
    code, _, err = compress(model, out)
    assert_refused(code, err, before, (model, outside), out, str(model / INDEX_NAME), shard)
    assert not out.exists()


@pytest.mark.parametrize("how", ["index-list", "weight-map-list", "weight-map-numbers"])
def test_index_wrong_types(model, tmp_path, compress, how):
    index_path = model / INDEX_NAME
    index = json.loads(index_path.read_text())
    content = {"index-list": [1, 2],
               "weight-map-list": {**index, "weight_map": sorted(index["weight_map"])},
               "weight-map-numbers": {**index, "weight_map": {n: 1 for n in index["weight_map"]}}}[how]
    index_path.write_text(json.dumps(content))
    before = snapshot(model)
    out = tmp_path / "out"
    code, _, err = compress(model, out)
    assert_refused(code, err, before, (model,), out, str(index_path))
    assert not out.exists()


# -- 8. shards that are links (as in the Hugging Face cache) keep working ----------------------
def test_symlinked_shards(model, tmp_path, compress):
    store = tmp_path / "store"
    store.mkdir()
    for shard in shards(model):
        target = store / shard.name
        shutil.move(shard, target)
        shard.symlink_to(target)
    before = snapshot(model, store)
    out = tmp_path / "out"
    code, _, err = compress(model, out)
    assert code == 0, err
    assert (out / "config.json").is_file()
    assert snapshot(model, store) == before
    assert not any(p.is_symlink() for p in out.iterdir())


def test_hub_cache_layout(model, tmp_path, compress):
    """models--org--name/snapshots/REV/* are links into ../../blobs: every file, extras included,
    resolves inside the repository's cache folder, so all of it is read and copied."""
    (model / "LICENSE").write_text("the tiny model's license\n")
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "0123abcd"
    blobs = repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for p in sorted(model.iterdir()):
        blob = blobs / hashlib.sha256(p.read_bytes()).hexdigest()
        shutil.copyfile(p, blob)
        (snap / p.name).symlink_to(Path("..", "..", "blobs", blob.name))
    before = snapshot(repo)
    out = tmp_path / "out"
    code, _, err = compress(snap, out)
    assert code == 0, err
    assert snapshot(repo) == before
    for name in ("LICENSE", "generation_config.json", "tokenizer.json"):
        assert (out / name).is_file() and not (out / name).is_symlink(), name
        assert (out / name).read_bytes() == (snap / name).read_bytes()


# -- 9. extra files: links out of the model directory, code, stray files -----------------------
SECRET = "TOP-SECRET-7f3a9c-do-not-copy"


@pytest.mark.parametrize("name,relative", [("generation_config.json", False), ("LICENSE", False),
                                           ("LICENSE", True)])
def test_extra_file_links_outside(model, tmp_path, compress, name, relative):
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"api_key": SECRET}))
    link = model / name
    link.unlink(missing_ok=True)
    link.symlink_to(Path("..", secret.name) if relative else secret)
    before = snapshot(model, secret)
    out = tmp_path / "out"
    code, _, err = compress(model, out)
    line = assert_refused(code, err, before, (model, secret), out, str(link), "outside")
    assert SECRET not in line
    if out.exists():
        for p in out.rglob("*"):
            assert p.is_symlink() or not p.is_file() or SECRET.encode() not in p.read_bytes(), p


def test_unknown_files_not_copied(model, tmp_path, compress):
    (model / "modeling_evil.py").write_text("import os\nos.system('echo pwned')\n")
    (model / "notes.txt").write_text("private notes\n")
    (model / "README.md").write_text("# tiny model card\n")
    (model / "LICENSE").write_text("the tiny model's license\n")
    before = snapshot(model)
    out = tmp_path / "out"
    code, _, err = compress(model, out)
    assert code == 0, err
    assert snapshot(model) == before
    assert not (out / "modeling_evil.py").exists()
    # the only Python file is this package's own modeling code (for trust_remote_code loading)
    assert [p.name for p in out.rglob("*.py")] == ["modeling_sola.py"]
    assert (out / "modeling_sola.py").read_bytes() == MODELING_SOURCE.read_bytes()
    assert not (out / "notes.txt").exists()
    assert (out / "LICENSE").read_text() == "the tiny model's license\n"
    # the dense model's card describes the dense model: the output gets its own
    assert "sola-stream" in (out / "README.md").read_text()


# -- 10. read-only output ----------------------------------------------------------------------
@pytest.mark.skipif(IS_ROOT, reason="root ignores directory permissions (see the tmpfs variant)")
def test_output_parent_read_only(model, tmp_path, compress):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    out = parent / "out"
    before = snapshot(model)
    try:
        code, _, err = compress(model, out)
    finally:
        parent.chmod(0o755)
    assert_refused(code, err, before, (model,), out, str(out))
    assert not out.exists()


@pytest.mark.parametrize("where", ["mount-point", "inside"])
def test_output_on_read_only_file_system(model, tmp_path, compress, where):
    mnt = tmp_path / "ro"
    with tmpfs(mnt, "ro,size=1m"):
        out = mnt if where == "mount-point" else mnt / "out"
        before = snapshot(model)
        code, _, err = compress(model, out)
        assert_refused(code, err, before, (model,), out, str(out))
        assert list(mnt.iterdir()) == []


# -- 11. disk full, for real -------------------------------------------------------------------
@pytest.mark.parametrize("size_kb", [12, 64, 144, 192])
def test_disk_full_then_resume(model, tmp_path, compress, size_kb):
    """A tmpfs too small for the run (12k: the first states file; 64k: block 0's shard; 144k: the
    states after block 0; 192k: block 1's shard), then enough space: same output as a normal run."""
    code, _, err = compress(model, tmp_path / "ref")
    assert code == 0, err
    ref = tree_hashes(tmp_path / "ref")
    before = snapshot(model)
    mnt = tmp_path / "disk"
    with tmpfs(mnt, f"size={size_kb}k"):
        out = mnt / "out"
        code, _, err = compress(model, out)
        line = assert_refused(code, err, before, (model,), out, str(out))
        assert "disk full" in line, line
        assert temp_files(out) == [], "temporary files left after disk full"
        remount(mnt, "size=64m")
        code, _, err = compress(model, out)
        assert code == 0, err
        assert temp_files(out) == []
        assert tree_hashes(out) == ref, "the resumed output differs from a normal run"
    assert snapshot(model) == before


def test_disk_full_at_any_step_of_the_finish(model, tmp_path, compress):
    """tmpfs sizes around what the finished output needs, so the space runs out at each write of
    the finish (outer shard, index, extras, config.json, the final marker): each run completes or
    stops with 'disk full' and no config.json (a complete-looking model), and once there is space
    the same command finishes with the normal output."""
    code, _, err = compress(model, tmp_path / "ref")
    assert code == 0, err
    ref = tree_hashes(tmp_path / "ref")
    pages = sum(-(-p.stat().st_size // 4096) for p in (tmp_path / "ref").iterdir() if p.is_file())
    before = snapshot(model)
    outcomes, problems = {}, []
    for kb in range(4 * pages - 8, 4 * pages + 28, 4):
        mnt = tmp_path / f"disk{kb}"
        with tmpfs(mnt, f"size={kb}k"):
            out = mnt / "out"
            code, _, err = compress(model, out)
            outcomes[kb] = code
            if code == 0:
                continue
            lines = [x for x in err.splitlines() if x.strip()]
            if code != 2 or len(lines) != 1 or not lines[0].startswith(PREFIX) or "disk full" not in lines[0]:
                problems.append(f"{kb}k: exit {code}, stderr {err!r}")
            if (out / "config.json").exists():
                problems.append(f"{kb}k: exit {code} ({lines[-1] if lines else ''}) but config.json was written")
            if temp_files(out):
                problems.append(f"{kb}k: temporary files left: {temp_files(out)}")
            remount(mnt, "size=64m")
            code, _, err = compress(model, out)
            if code != 0 or tree_hashes(out) != ref:
                problems.append(f"{kb}k: the run again with space: exit {code} {err!r}, output "
                                f"{'identical' if tree_hashes(out) == ref else 'differs'}")
    assert snapshot(model) == before
    assert 0 in outcomes.values() and 2 in outcomes.values(), f"the window missed the finish: {outcomes}"
    assert not problems, "\n".join(problems)


def _spill_budget(capsys, model_dir: Path, *opts) -> float:
    """A --max-host-memory (GiB) between `plan`'s in-RAM and spilled needs: the cache spills."""
    opts = [o for o in map(str, opts) if o != "--no-progress"]  # a compress-only option
    code, out, err = cli(capsys, "plan", model_dir, *opts, "--json", "--no-measure", "--max-host-memory", 64)
    assert code == 0, out + err
    p = json.loads(out.strip().splitlines()[-1])
    assert not p["spill"]
    in_ram = p["peak_host_bytes"]
    spilled = in_ram - p["states_bytes"] + 2 * 4 * p["batch_tokens"] * 64  # two chunks of hidden 64
    assert spilled < in_ram, p
    budget = f"{(in_ram + spilled) / 2 / GIB:.12f}"
    code, out, err = cli(capsys, "plan", model_dir, *opts, "--json", "--no-measure", "--max-host-memory", budget)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["spill"], out + err
    return budget


@pytest.mark.parametrize("size_kb", [32, 112])
def test_disk_full_with_spilled_states(model, tmp_path, capsys, small_calib, size_kb):
    """The calibration cache spilled to memory-mapped files on a full tmpfs (32k: the first states
    file does not fit; 112k: the states after block 1): one 'disk full' line from a child
    process, never a SIGBUS; then with space, the same output as an in-RAM run."""
    opts = [*FAST, "--calib", str(small_calib), "--batch-tokens", "32"]
    code, _, err = cli(capsys, "compress", model, tmp_path / "ref", *opts)
    assert code == 0, err
    ref = tree_hashes(tmp_path / "ref")
    budget = _spill_budget(capsys, model, *opts)
    before = snapshot(model)
    mnt = tmp_path / "disk"
    with tmpfs(mnt, f"size={size_kb}k"):
        out = mnt / "out"
        r = subprocess.run([sys.executable, "-m", "sola_stream", "compress", str(model), str(out), *opts,
                            "--max-host-memory", budget], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode >= 0, f"killed by signal {-r.returncode} (SIGBUS on a full disk?): {r.stderr}"
        assert "Traceback" not in r.stderr, r.stderr
        line = error_line(r.stderr)
        assert r.returncode == 2, line
        assert str(out) in line and "disk full" in line, line
        assert snapshot(model) == before
        assert not (out / "config.json").exists()
        left = temp_files(out)  # checked last: first see that the run resumes despite them
        remount(mnt, "size=64m")
        code, stdout, err = cli(capsys, "compress", model, out, *opts, "--max-host-memory", budget)
        assert code == 0, err
        assert "spilled to disk" in stdout
        assert temp_files(out) == []
        assert tree_hashes(out) == ref, "the resumed spilled output differs from the in-RAM run"
    assert snapshot(model) == before
    assert left == [], f"temporary files left in OUTPUT after disk full: {left}"


# -- 12. eval: bad text and options ------------------------------------------------------------
@pytest.mark.parametrize("case", ["invalid-utf8", "seqlen-1", "max-windows-0", "missing-text"])
def test_eval_bad_input(model, tmp_path, capsys, case):
    text = tmp_path / "eval.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    args, names = [], []
    if case == "invalid-utf8":
        text.write_bytes(b"\xff\xfe abc" + b" some more words" * 100)
        names = [str(text), "UTF-8"]
    elif case == "seqlen-1":
        args, names = ["--seqlen", "1"], ["--seqlen"]
    elif case == "max-windows-0":
        args, names = ["--max-windows", "0"], ["--max-windows"]
    else:
        text = tmp_path / "absent.txt"
        names = [str(text)]
    before = snapshot(model, *([text] if text.exists() else []))
    code, out, err = cli(capsys, "eval", model, "--text", text, "--seqlen", "32", "--max-windows", "1",
                         "--no-progress", *args)
    assert_refused(code, err, before, (model, *([text] if text.exists() else [])), None, *names)
    assert "perplexity" not in out


# -- 13. an edited `sola` section of a finished output -----------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_tokenizer, small_calib) -> Path:
    base = tmp_path_factory.mktemp("finished")
    src = make_tiny("llama", base / "model", tiny_tokenizer, shards=True)
    out = base / "out"
    # per block: every block is factored (a model-wide allocation may keep block 0 dense)
    code = main(["compress", str(src), str(out), *FAST, "--calib", str(small_calib), "--allocation", "block"])
    assert code == 0
    return out


def _first_factored(sola: dict) -> tuple[str, int]:
    """(layer, rank) of the first low-rank layer of block 0."""
    for name, spec in sola["blocks"][0]["layers"].items():
        if isinstance(spec.get("rank"), int):
            return name, spec["rank"]
    raise AssertionError("no factored layer in block 0")


def _edit_section(sola: dict, case: str):
    layers = sola["blocks"][0]["layers"]
    name, rank = _first_factored(sola)
    if case == "section-list":
        return [sola]
    if case == "blocks-short":
        sola["blocks"] = sola["blocks"][:-1]
    elif case == "rank-string":
        layers[name]["rank"] = str(rank)
    elif case == "rank-negative":
        layers[name]["rank"] = -3
    elif case == "bogus-layer":
        layers["mlp.bogus"] = {"rank": None}
    elif case == "format-version":
        sola["format_version"] = 99
    elif case == "rank-mismatch":
        layers[name]["rank"] = rank + 1
    return sola


SECTION_CASES = ["section-list", "blocks-short", "rank-string", "rank-negative", "bogus-layer", "format-version",
                 "rank-mismatch"]


@pytest.fixture(params=SECTION_CASES)
def edited(request, finished, tmp_path) -> tuple[Path, list[str]]:
    """A copy of the finished output with its config.json's sola section edited, and what a
    refusal must name: config.json, or for a rank that disagrees with the tensors, the layer."""
    case = request.param
    out = tmp_path / "out"
    shutil.copytree(finished, out, symlinks=True)
    config = json.loads((out / "config.json").read_text())
    layer, _ = _first_factored(config["sola"])
    config["sola"] = _edit_section(config["sola"], case)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out, ([layer] if case == "rank-mismatch" else [str(out / "config.json")])


def test_edited_sola_section_eval(edited, capsys):
    out, names = edited
    before = snapshot(out)
    code, stdout, err = cli(capsys, "eval", out, "--max-windows", 1, "--seqlen", 32, "--no-progress")
    assert_refused(code, err, before, (out,), None, *names)
    assert "perplexity" not in stdout


def test_edited_sola_section_inspect(edited, capsys):
    out, names = edited
    before = snapshot(out)
    code, stdout, err = cli(capsys, "inspect", out)
    assert_refused(code, err, before, (out,), None, *names)


def test_edited_sola_section_load(edited):
    out, names = edited
    before = snapshot(out)
    with pytest.raises(InputError) as info:
        sola_stream.load(out)
    assert "\n" not in str(info.value)
    for name in names:
        assert name in str(info.value), str(info.value)
    assert snapshot(out) == before

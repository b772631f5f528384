"""Bad inputs through the CLI: each one gets a one-line error naming the problem and the file,
tensor or option, exit code 2, the input left untouched and no output that looks complete
(no config.json)."""
from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from sola_stream.storage.checkpoint import INDEX_NAME
from sola_stream.cli import main

from conftest import CALIB_TEXT, make_tiny

FAST = ["--nsamples", "4", "--seqlen", "32", "--no-progress"]
PREFIX = "sola-stream: error:"


# -- helpers -----------------------------------------------------------------------------------
@pytest.fixture
def model(tmp_path, tiny_tokenizer) -> Path:
    """A fresh sharded tiny llama, owned by this test (free to damage)."""
    return make_tiny("llama", tmp_path / "model", tiny_tokenizer, shards=True)


@pytest.fixture(scope="module")
def small_calib(tmp_path_factory) -> Path:
    """A short slice of the shipped calibration text: tokenizing all of it costs seconds per run."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CALIB_TEXT.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    return path


@pytest.fixture
def compress(capsys, small_calib):
    """Run `sola-stream compress MODEL OUT` in-process: (exit code, stdout, stderr).
    Options in `extra` come last, so they override the defaults here."""
    calib_before = snapshot(small_calib)

    def run(model_dir, out_dir, *extra) -> tuple[int, str, str]:
        code = main(["compress", str(model_dir), str(out_dir), *FAST, "--calib", str(small_calib),
                     *map(str, extra)])
        out, err = capsys.readouterr()
        assert snapshot(small_calib) == calib_before, "the calibration text was changed"
        return code, out, err
    return run


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under (or at) each root, keyed by path."""
    files = {}
    for root in roots:
        for p in ([root] if root.is_file() else sorted(root.rglob("*"))):
            if p.is_file():
                files[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return files


def shard_of(model_dir: Path, tensor: str) -> Path:
    return model_dir / json.loads((model_dir / INDEX_NAME).read_text())["weight_map"][tensor]


def shards(model_dir: Path) -> list[Path]:
    return sorted(model_dir / s for s in set(json.loads((model_dir / INDEX_NAME).read_text())["weight_map"].values()))


def error_line(err: str) -> str:
    """The one non-empty line of stderr, which must be the CLI's error line."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one non-empty stderr line, got {len(lines)}:\n{err}"
    assert lines[0].startswith(PREFIX), lines[0]
    return lines[0]


def assert_refused(code: int, err: str, before: dict, after_roots: tuple[Path, ...], out_dir: Path | None,
                   *names: str, exit_code: int = 2) -> str:
    """Exit code, one error line naming every string in `names`, inputs unchanged, output not complete."""
    line = error_line(err)
    assert code == exit_code, f"exit code {code}, expected {exit_code}: {line}"
    for name in names:
        assert name in line, f"{name!r} not named in: {line}"
    assert snapshot(*after_roots) == before, "an input file was changed, added or removed"
    if out_dir is not None:
        assert not (out_dir / "config.json").exists(), "the output looks complete (config.json written)"
        if out_dir.is_dir():
            assert not list(out_dir.rglob(".*.tmp")), "temporary files left in the output"
    return line


def set_tensor(path: Path, name: str, edit) -> None:
    tensors = load_file(str(path))
    t = tensors[name].clone()
    edit(t)
    tensors[name] = t
    save_file(tensors, str(path), metadata={"format": "pt"})


# -- 1. missing shard --------------------------------------------------------------------------
def test_missing_shard(model, tmp_path, compress):
    gone = shards(model)[-1]
    gone.unlink()
    before = snapshot(model)
    out = tmp_path / "out"
    code, _, err = compress(model, out)
    line = assert_refused(code, err, before, (model,), out, gone.name)
    assert "missing" in line


# -- 2. truncated or corrupt shard -------------------------------------------------------------
@pytest.mark.parametrize("which", [0, -1])
def test_truncated_shard(model, tmp_path, compress, which):
    shard = shards(model)[which]
    os.truncate(shard, shard.stat().st_size - 16)
    before = snapshot(model)
    out = tmp_path / "out"
    code, _, err = compress(model, out)
    assert_refused(code, err, before, (model,), out, shard.name)


def test_corrupt_shard_header(model, tmp_path, compress):
    shard = shards(model)[0]
    data = bytearray(shard.read_bytes())
    data[:8] = b"\xde\xad\xbe\xef\xff\xff\xff\x7f"  # header length: garbage
    shard.write_bytes(bytes(data))
    before = snapshot(model)
    out = tmp_path / "out"
    code, _, err = compress(model, out)
    assert_refused(code, err, before, (model,), out, shard.name)


# -- 3. index names a tensor its shard lacks ---------------------------------------------------
def test_index_names_absent_tensor(model, tmp_path, compress):
    index_path = model / INDEX_NAME
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    bogus = "model.layers.0.mlp.bogus_proj.weight"
    index["weight_map"][bogus] = shard
    index_path.write_text(json.dumps(index, indent=2))
    before = snapshot(model)
    out = tmp_path / "out"
    code, _, err = compress(model, out)
    assert_refused(code, err, before, (model,), out, shard, bogus)


# -- 4. unsupported architecture ---------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["falcon_mamba_x", "gpt2"])
def test_unsupported_architecture(model, tmp_path, compress, model_type):
    config_path = model / "config.json"
    config = json.loads(config_path.read_text())
    config["model_type"] = model_type
    config_path.write_text(json.dumps(config, indent=2))
    before = snapshot(model)
    out = tmp_path / "out"
    code, _, err = compress(model, out)
    line = assert_refused(code, err, before, (model,), out, "config.json", model_type)
    assert "unsupported" in line.lower() or "not supported" in line.lower(), line


# -- 5. ratios out of range --------------------------------------------------------------------
@pytest.mark.parametrize("option,value", [("--ratio", "0"), ("--ratio", "1.0"), ("--ratio", "1.5"),
                                          ("--ratio", "-0.1"), ("--prime-ratio", "1.0"),
                                          ("--prime-ratio", "-0.2")])
def test_ratio_out_of_range(model, tmp_path, compress, option, value):
    before = snapshot(model)
    out = tmp_path / "out"
    code, _, err = compress(model, out, f"{option}={value}")
    assert_refused(code, err, before, (model,), out, option, value)
    assert not out.exists(), "output directory created for a rejected option"


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cuda:99999", "cuda:1"])
def test_device_that_does_not_exist(model, tmp_path, compress, device):
    before = snapshot(model)
    out = tmp_path / "out"
    code, _, err = compress(model, out, f"--device={device}")
    assert_refused(code, err, before, (model,), out, "--device", device)
    assert not out.exists()


# -- 6. calibration text too short -------------------------------------------------------------
def test_calibration_text_few_words(model, tmp_path, compress):
    calib = tmp_path / "calib.txt"
    calib.write_text("only a few words here\n", encoding="utf-8")
    before = snapshot(model, calib)
    out = tmp_path / "out"
    code, _, err = compress(model, out, "--calib", calib)
    line = assert_refused(code, err, before, (model, calib), out, str(calib))
    assert "tokens" in line


def test_calibration_text_too_short_for_windows(model, tmp_path, compress):
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"word{i} of the calibration text." for i in range(60)) + "\n", encoding="utf-8")
    before = snapshot(model, calib)
    out = tmp_path / "out"
    code, _, err = compress(model, out, "--calib", calib, "--nsamples", 2000, "--seqlen", 64)
    line = assert_refused(code, err, before, (model, calib), out, str(calib))
    assert "too short" in line and "2000" in line


# -- 7. tokenizer missing ----------------------------------------------------------------------
def test_tokenizer_missing(model, tmp_path, compress):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    before = snapshot(model)
    out = tmp_path / "out"
    code, _, err = compress(model, out)
    line = assert_refused(code, err, before, (model,), out, str(model))
    assert "tokenizer" in line


# -- 8. non-finite weights ---------------------------------------------------------------------
def test_nan_in_block_weight(model, tmp_path, compress):
    name = "model.layers.1.mlp.up_proj.weight"
    shard = shard_of(model, name)
    set_tensor(shard, name, lambda t: t.view(-1).__setitem__(7, float("nan")))
    before = snapshot(model)
    out = tmp_path / "out"
    code, _, err = compress(model, out)
    line = assert_refused(code, err, before, (model,), out, name, shard.name)
    assert "NaN" in line


def test_inf_in_embedding(model, tmp_path, compress):
    name = "model.embed_tokens.weight"
    set_tensor(shard_of(model, name), name, lambda t: t[:, 0].fill_(float("inf")))
    before = snapshot(model)
    out = tmp_path / "out"
    code, _, err = compress(model, out)
    line = assert_refused(code, err, before, (model,), out, name)
    assert "Inf" in line and ".safetensors" in line


def test_nonfinite_calibration_states(model, tmp_path, compress):
    """Finite weights whose outputs overflow: the states entering the next block are not finite."""
    name = "model.layers.0.mlp.down_proj.weight"
    set_tensor(shard_of(model, name), name, lambda t: t.fill_(3e38))
    before = snapshot(model)
    out = tmp_path / "out"
    code, _, err = compress(model, out)
    line = assert_refused(code, err, before, (model,), out, "calibration states")
    assert "block 0" in line and "NaN or Inf" in line


def test_nonfinite_statistics_inside_a_block(model, tmp_path, compress):
    """Overflow inside the FFN (gate): caught in the statistics, before any decomposition."""
    name = "model.layers.1.mlp.gate_proj.weight"
    set_tensor(shard_of(model, name), name, lambda t: t.fill_(3e38))
    before = snapshot(model)
    out = tmp_path / "out"
    code, _, err = compress(model, out)
    line = assert_refused(code, err, before, (model,), out, "calibration states")
    assert "block 1" in line and "NaN or Inf" in line


# -- 9. disk full while writing ----------------------------------------------------------------
def cli_limited(model_dir, out_dir, calib, *extra, fsize: int | None = None, crash: str | None = None):
    """`sola-stream compress` in a child process whose files may not grow past `fsize` bytes
    (RLIMIT_FSIZE, with SIGXFSZ ignored so that the write fails with EFBIG, as a full disk fails a
    write with ENOSPC; no root needed), or killed at a named crash point."""
    def limit():
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = {k: v for k, v in os.environ.items() if k != "SOLA_STREAM_CRASH_AT"}
    if crash:
        env["SOLA_STREAM_CRASH_AT"] = crash
    return subprocess.run([sys.executable, "-m", "sola_stream", "compress", str(model_dir), str(out_dir), *FAST,
                           "--calib", str(calib), *map(str, extra)], env=env, preexec_fn=limit,
                          capture_output=True, text=True, timeout=600)


def test_disk_full_then_resume(model, tmp_path, small_calib):
    """The first block shard (~100 kB) does not fit under a 60 kB file-size limit; the states file
    (~36 kB) does. Then the limit is lifted and the same command resumes."""
    before = snapshot(model)
    out = tmp_path / "out"
    r = cli_limited(model, out, small_calib, fsize=60_000)
    line = assert_refused(r.returncode, r.stderr, before, (model,), out, "model-block-00000.safetensors")
    assert "disk full" in line.lower(), line
    assert not list(out.rglob("*.tmp")), "temporary files left in the output"
    assert (out / ".sola-run" / "states-00000.safetensors").is_file()  # the committed start survives

    r = cli_limited(model, out, small_calib)
    assert r.returncode == 0, r.stderr
    assert (out / "config.json").is_file()
    assert not (out / ".sola-run").exists()
    assert not list(out.rglob("*.tmp"))
    assert snapshot(model) == before


# -- 10. output directory holding something else -----------------------------------------------
@pytest.mark.parametrize("overwrite", [False, True])
def test_output_dir_not_ours(model, tmp_path, compress, overwrite):
    out = tmp_path / "out"
    out.mkdir()
    notes = out / "notes.txt"
    notes.write_text("my notes, not a model\n")
    before = snapshot(model, out)
    code, _, err = compress(model, out, *(["--overwrite"] if overwrite else []))
    assert_refused(code, err, before, (model, out), out, str(out))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# -- 11. output directory is the input directory -----------------------------------------------
@pytest.mark.parametrize("spelling", ["same", "symlink"])
def test_output_is_input(model, tmp_path, compress, spelling):
    out = model
    if spelling == "symlink":
        out = tmp_path / "link"
        out.symlink_to(model, target_is_directory=True)
    before = snapshot(model)
    code, _, err = compress(model, out)
    line = assert_refused(code, err, before, (model,), None, str(out))
    assert "input" in line
    assert not (model / ".sola-run").exists()


# -- 12. output holding a run of other options -------------------------------------------------
def test_finished_run_other_options(model, tmp_path, compress):
    out = tmp_path / "out"
    code, _, err = compress(model, out, "--ratio", "0.2")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["sola"]["ratio"] == 0.2
    before = snapshot(model, out)

    code, _, err = compress(model, out, "--ratio", "0.3")
    line = error_line(err)
    assert code == 2, line
    assert str(out) in line and "--overwrite" in line
    assert snapshot(model, out) == before, "the earlier output or the input was changed"

    code, _, err = compress(model, out, "--ratio", "0.3", "--overwrite")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["sola"]["ratio"] == 0.3
    assert snapshot(model) == {k: v for k, v in before.items() if k.startswith(str(model) + os.sep)}


def test_unfinished_run_other_options(model, tmp_path, compress, small_calib):
    out = tmp_path / "out"  # an unfinished run at ratio 0.2: killed after block 0 committed
    r = cli_limited(model, out, small_calib, "--ratio", "0.2", crash="block_committed:1")
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert (out / ".sola-run").is_dir() and not (out / "config.json").exists()
    before = snapshot(model, out)
    before.pop(str(out / ".sola-stream.lock"))  # the killed run's lock file: nobody holds it, removed on release

    code, _, err = compress(model, out, "--ratio", "0.3")
    line = assert_refused(code, err, before, (model, out), out, str(out), "--overwrite")
    assert "ratio" in line

    code, _, err = compress(model, out, "--ratio", "0.3", "--overwrite")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["sola"]["ratio"] == 0.3
    assert not (out / ".sola-run").exists()

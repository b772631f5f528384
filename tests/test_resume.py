"""Crash safety: kill -9 at many points, SIGTERM, locks; resumed output is byte-identical."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import make_tiny, output_hashes
from sola_stream.storage.runlog import read_log
from sola_stream.pipeline.options import CompressOptions, prime_options
from sola_stream.pipeline.plan import make_plan
from sola_stream.pipeline.resume import LOCK, RUN_DIR
from sola_stream.pipeline.stop import EXIT_INTERRUPTED

ARGS = ["--ratio", "0.3", "--nsamples", "6", "--seqlen", "48", "--batch-tokens", "96", "--no-progress"]


@pytest.fixture(scope="module")
def model4(tmp_path_factory, tiny_tokenizer):
    return make_tiny("llama", tmp_path_factory.mktemp("m4") / "llama4", tiny_tokenizer, num_hidden_layers=4)


def cli(model, out, *extra, crash: str | None = None, wait=True):
    env = {k: v for k, v in os.environ.items() if k != "SOLA_STREAM_CRASH_AT"}
    if crash:
        env["SOLA_STREAM_CRASH_AT"] = crash
    cmd = [sys.executable, "-m", "sola_stream", "compress", str(model), str(out), *ARGS, *extra]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


hashes = output_hashes


@pytest.fixture(scope="module")
def reference(model4, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    r = cli(model4, out)
    assert r.returncode == 0, r.stderr
    return hashes(out)


def test_deterministic(model4, reference, tmp_path):
    out = tmp_path / "again"
    assert cli(model4, out).returncode == 0
    assert hashes(out) == reference
    assert not (out / RUN_DIR).exists()


# Named crash points, applied one after another to the same output directory (each run resumes
# the last). tensors_written:N is the N-th atomic tensor-file write of that process, killed after
# the data is written but before the rename. With 4 blocks: a fresh run writes states-0, shard 0,
# states-1, ...; a resumed one starts with the shard of its first block; the last block writes no
# states, then the outer shard follows.
CRASHES = [
    "tensors_written:1",  # fresh: initial states file, before rename
    "tensors_written:2",  # shard 0 written, not renamed
    "block_written:1",  # shard 0 renamed, block not committed
    "tensors_written:2",  # resumed at 0: states-1 written, not renamed
    "block_committed:1",  # block 0 committed
    "tensors_written:1",  # resumed at 1: shard 1 written, not renamed
    "block_committed:2",  # blocks 1 and 2 committed
    "block_written:1",  # shard 3 renamed, not committed
    "tensors_written:2",  # resumed at 3: the outer shard, not renamed
    "config_written:1",  # config.json written, run state not yet removed
]


def test_kill9_at_named_points_then_resume(model4, reference, tmp_path):
    out = tmp_path / "out"
    for point in CRASHES:
        r = cli(model4, out, crash=point)
        assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr)
        if point != "config_written:1":
            assert not (out / "config.json").exists(), point
    r = cli(model4, out)
    assert r.returncode == 0, r.stderr
    assert hashes(out) == reference
    assert not (out / RUN_DIR).exists()


def test_kill9_at_random_times_then_resume(model4, reference, tmp_path):
    seed = int(os.environ.get("SOLA_TEST_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    out = tmp_path / "out"
    kills = 0
    for _ in range(6):
        proc = cli(model4, out, wait=False)
        time.sleep(rng.uniform(2.0, 7.0))  # imports take ~2-3 s; the run itself a few seconds more
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.communicate()
    r = cli(model4, out)
    assert r.returncode == 0, (seed, r.stderr)
    assert hashes(out) == reference, f"seed {seed}"
    print(f"random kills: {kills} (seed {seed})")


def test_sigterm_stops_at_safe_point_and_resumes(model4, reference, tmp_path):
    out = tmp_path / "out"
    r = cli(model4, out, crash="block_written:2:TERM")
    assert r.returncode == EXIT_INTERRUPTED, r.stderr
    ack, stopped = r.stderr.strip().splitlines()  # the signal acknowledged at once, then the stop
    assert ack.startswith("sola-stream: SIGTERM received") and "stopping after the current block" in ack
    assert stopped.startswith("sola-stream: stopped:") and "resume" in stopped and "error" not in r.stderr
    manifest = json.loads((out / RUN_DIR / "manifest.json").read_text())
    # the signal arrives while block 1 commits in the background; the main thread may already be
    # computing block 2, which then finishes and commits before the stop
    done = len(manifest["blocks"])
    assert done in (2, 3)
    assert not (out / "config.json").exists()
    r = cli(model4, out)
    assert r.returncode == 0 and f"resumed at block {done}" in r.stdout
    assert hashes(out) == reference
    # the run log tells the story: start, blocks, stop, resume (verified), the rest, done
    log = read_log(out)
    events = [(e["event"], e.get("block", e.get("after_block"))) for e in log]
    assert events == ([("start", 0), ("survey", None)] + [("block", i) for i in range(done)] + [("stopped", done - 1),
                      ("start", done), ("verified", None)] + [("block", i) for i in range(done, 4)] + [("done", None)])
    blocks = [e for e in log if e["event"] == "block"]
    block = blocks[0]
    assert block["seconds"] > 0 and block["peak_host_rss_bytes"] > 2**20
    # the model-wide allocation may keep a block dense; the model as a whole is compressed
    assert all(0 < e["kept_fraction"] <= 1 for e in blocks) and min(e["kept_fraction"] for e in blocks) < 1
    assert set(block["layers"]) == set(block["whitened_error"]) and "mlp.down_proj" in block["layers"]


@pytest.mark.parametrize("spill", [False, True])
def test_sigterm_in_the_survey_stops_there_and_resumes(model4, reference, tmp_path, spill):
    """A stop request during the survey pass (--allocation global, the default) is obeyed after
    the survey's current block, not after the survey: exit 75, nothing committed, and the rerun
    (which surveys again) writes the uninterrupted run's bytes. In RAM and with a spilled cache."""
    out = tmp_path / "out"
    extra = ["--max-host-memory", f"{_spill_budget(model4):.9f}"] if spill else []
    r = cli(model4, out, *extra, crash="survey_block:2:TERM")
    assert r.returncode == EXIT_INTERRUPTED, r.stderr
    assert "stopped in the survey pass after block 1 of 4" in r.stderr and "error" not in r.stderr
    manifest = json.loads((out / RUN_DIR / "manifest.json").read_text())
    assert manifest["blocks"] == [] and manifest["states"] is None
    assert [e["event"] for e in read_log(out)] == ["start", "stopped"] and read_log(out)[-1]["survey_block"] == 1
    r = cli(model4, out, *extra)
    assert r.returncode == 0, r.stderr
    assert ("cache spilled to disk" in r.stdout) == spill
    assert hashes(out) == reference


def _spill_budget(model) -> float:
    """A host budget (GiB) that spills the calibration cache of ARGS's run to disk: a sixth of the
    cache (288 tokens) below what the run needs with it in RAM; spilled, it needs two 96-token chunks."""
    cfg = json.loads((model / "config.json").read_text())
    opts = CompressOptions(ratio=0.3, nsamples=6, seqlen=48, batch_tokens=96, **prime_options(None))  # the CLI's
    in_ram = make_plan(cfg, opts, torch.device("cpu"), budget_host=2**40)
    budget = in_ram.peak_host - in_ram.states_bytes // 6
    assert not in_ram.spill and make_plan(cfg, opts, torch.device("cpu"), budget_host=budget).spill
    return budget / 2**30


def test_rerun_of_finished_output_is_a_no_op_and_other_options_refused(model4, reference, tmp_path):
    out = tmp_path / "out"
    assert cli(model4, out).returncode == 0
    r = cli(model4, out)
    assert r.returncode == 0 and "already complete" in r.stdout
    r = cli(model4, out, "--seed", "1")
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert hashes(out) == reference
    assert cli(model4, out, "--seed", "1", "--overwrite").returncode == 0
    assert hashes(out) != reference


def test_unfinished_run_with_other_options_refused(model4, tmp_path):
    out = tmp_path / "out"
    assert cli(model4, out, crash="block_committed:1").returncode == -signal.SIGKILL
    r = cli(model4, out, "--prime-ratio", "0.2")
    assert r.returncode == 2 and "prime_ratio" in r.stderr and "--overwrite" in r.stderr


HOLD_LOCK = """
import sys, time
from pathlib import Path
from sola_stream.errors import OutputError
from sola_stream.storage.lock import DirLock
path, start, hold = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
time.sleep(max(0.0, start - time.time()))
try:
    DirLock(path, str(path.parent)).acquire()
except OutputError as exc:
    print("LOCKED", exc, flush=True)
    sys.exit(3)
print("HELD", flush=True)
time.sleep(hold)
"""


def hold_lock(path, start: float, hold: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path), str(start), str(hold)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_lock_held_by_live_process_refuses_stale_lock_is_taken(model4, reference, tmp_path):
    out = tmp_path / "out"
    assert cli(model4, out, crash="block_committed:1").returncode == -signal.SIGKILL
    lock = out / LOCK
    assert json.loads(lock.read_text())["pid"]  # left by the killed process: stale, nobody holds it
    holder = hold_lock(lock, 0, 60)
    try:
        assert holder.stdout.readline().strip() == "HELD"
        r = cli(model4, out)
        assert r.returncode == 2 and f"pid {holder.pid}" in r.stderr, r.stderr
        r = cli(model4, out, "--overwrite")  # --overwrite never deletes under a live writer
        assert r.returncode == 2 and f"pid {holder.pid}" in r.stderr, r.stderr
        assert (out / RUN_DIR / "manifest.json").is_file()
    finally:
        holder.kill()
        holder.wait()
    r = cli(model4, out)  # the holder is gone: its lock went with it
    assert r.returncode == 0, r.stderr
    assert hashes(out) == reference
    assert not lock.exists()


def test_lock_is_exclusive_when_many_processes_take_over_a_stale_lock_at_once(tmp_path):
    lock = tmp_path / LOCK
    lock.write_text(json.dumps({"pid": 999999, "host": "gone"}))  # a stale lock file
    start = time.time() + 3.0  # every process past its imports, then all at once
    procs = [hold_lock(lock, start, 4.0) for _ in range(8)]
    results = [p.communicate(timeout=60)[0].split()[0] for p in procs]
    assert results.count("HELD") == 1, results
    assert results.count("LOCKED") == 7, results


# -- integrity: what a resume trusts is verified against the manifest's checksums ---------------
def flip_byte(path, offset: int) -> None:
    """Change one byte in place: same size, same header."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0xFF]))


def killed_after_two_blocks(model, out):
    r = cli(model, out, crash="block_committed:2")
    assert r.returncode == -signal.SIGKILL, r.stderr
    return json.loads((out / RUN_DIR / "manifest.json").read_text())


def one_error_line(r, *names):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("sola-stream: error:"), r.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def test_damaged_committed_shard_is_refused_on_resume(model4, tmp_path):
    out = tmp_path / "out"
    killed_after_two_blocks(model4, out)
    shard = out / "model-block-00000.safetensors"
    flip_byte(shard, shard.stat().st_size - 3)
    one_error_line(cli(model4, out), shard.name, "damaged", "--overwrite")
    assert not (out / "config.json").exists()


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_damaged_or_deleted_states_file_is_refused_on_resume(model4, tmp_path, damage):
    out = tmp_path / "out"
    killed_after_two_blocks(model4, out)
    states = out / RUN_DIR / "states-00002.safetensors"
    if damage == "flip":
        flip_byte(states, states.stat().st_size // 2)
    else:
        states.unlink()
    one_error_line(cli(model4, out), states.name, "damaged" if damage == "flip" else "missing")


@pytest.mark.parametrize("content", ["{not json", "[]", '{"format_version": 2, "fingerprint": {}, "blocks": "x"}', ""])
def test_damaged_manifest_is_refused_on_resume(model4, tmp_path, content):
    out = tmp_path / "out"
    killed_after_two_blocks(model4, out)
    (out / RUN_DIR / "manifest.json").write_text(content)
    one_error_line(cli(model4, out), "manifest.json", "damaged", "--overwrite")
    r = cli(model4, out, "--overwrite")
    assert r.returncode == 0, r.stderr


def test_a_block_entry_with_a_damaged_prime_split_is_refused_on_resume(model4, tmp_path):
    """The split a block chose (--prime-ratio auto, the default) is copied into config.json on
    completion: a damaged one is refused before anything is written from it."""
    out = tmp_path / "out"
    killed_after_two_blocks(model4, out)
    path = out / RUN_DIR / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["blocks"][0]["prime_split"] in (0.25, 0.45, 0.65)
    manifest["blocks"][0]["prime_split"] = "0.45; rm -rf /"
    path.write_text(json.dumps(manifest))
    one_error_line(cli(model4, out), "manifest.json", "damaged", "--overwrite")
    assert not (out / "config.json").exists()


def test_same_size_change_inside_a_compressed_input_block_is_detected(tiny_tokenizer, tmp_path):
    """A byte changed in the middle of block 0's weights, away from the header and the first and
    last MiB that the cheap fingerprint reads: only the per-block input digest can see it."""
    model = make_tiny("llama", tmp_path / "wide", tiny_tokenizer, shards=False, hidden_size=512,
                      intermediate_size=1024, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4)
    out = tmp_path / "out"
    killed_after_two_blocks(model, out)
    shard = model / "model.safetensors"
    header_len = int.from_bytes(shard.read_bytes()[:8], "little")
    header = json.loads(shard.read_bytes()[8:8 + header_len])
    mids = [8 + header_len + sum(info["data_offsets"]) // 2 for name, info in header.items()
            if name.startswith("model.layers.0.") and name.endswith("proj.weight")]
    inside = [m for m in mids if (1 << 20) < m < shard.stat().st_size - (1 << 20)]
    assert inside, "a change must lie outside the hashed edges"
    offset = inside[0]
    size = shard.stat().st_size
    flip_byte(shard, offset)
    assert shard.stat().st_size == size
    one_error_line(cli(model, out), "block 0 changed", "--overwrite")


def test_finished_output_missing_or_damaged_shard_is_not_complete(model4, reference, tmp_path):
    out = tmp_path / "out"
    assert cli(model4, out).returncode == 0
    shard = out / "model-block-00001.safetensors"
    data = shard.read_bytes()
    shard.unlink()
    r = cli(model4, out)
    assert "already complete" not in r.stdout
    one_error_line(r, shard.name, "missing")
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    one_error_line(cli(model4, out), shard.name, "changed")
    shard.write_bytes(data)
    r = cli(model4, out)
    assert r.returncode == 0 and "already complete" in r.stdout
    assert hashes(out) == reference


# --fit compensate carries a second stream (original-N beside states-N): a fresh run writes
# states-0, original-0, then per block the shard, states-(i+1), original-(i+1), the manifest.
COMPENSATE = ["--fit", "compensate"]
CRASHES_COMPENSATE = [
    "tensors_written:2",  # fresh: states-0 renamed, original-0 written, not renamed
    "tensors_written:5",  # shard 0, states-1 renamed; original-1 written, not renamed
    "block_committed:2",  # resumed at 0: blocks 0 and 1 committed
    "tensors_written:3",  # resumed at 2: shard 2, states-3 renamed, original-3 not renamed
]


def test_compensating_fit_killed_at_named_points_resumes_identically(model4, tmp_path):
    ref = tmp_path / "ref"
    assert cli(model4, ref, *COMPENSATE).returncode == 0
    assert hashes(ref) != hashes_of_plain(model4, tmp_path / "plain")  # the fit changed the output
    out = tmp_path / "out"
    for point in CRASHES_COMPENSATE:
        r = cli(model4, out, *COMPENSATE, crash=point)
        assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr)
        assert not (out / "config.json").exists(), point
    manifest = json.loads((out / RUN_DIR / "manifest.json").read_text())
    assert set(manifest["states"]) == {"block", "sha256", "original_sha256"}
    r = cli(model4, out, *COMPENSATE)
    assert r.returncode == 0, r.stderr
    assert hashes(out) == hashes(ref)
    assert not (out / RUN_DIR).exists()


def hashes_of_plain(model, out):
    assert cli(model, out).returncode == 0
    return hashes(out)


@pytest.mark.parametrize("damage", ["flip", "delete", "unrecorded"])
def test_damaged_original_states_are_refused_on_resume(model4, tmp_path, damage):
    out = tmp_path / "out"
    r = cli(model4, out, *COMPENSATE, crash="block_committed:2")
    assert r.returncode == -signal.SIGKILL, r.stderr
    states = out / RUN_DIR / "original-00002.safetensors"
    if damage == "flip":
        flip_byte(states, states.stat().st_size // 2)
        one_error_line(cli(model4, out, *COMPENSATE), states.name, "damaged")
    elif damage == "delete":
        states.unlink()
        one_error_line(cli(model4, out, *COMPENSATE), states.name, "missing")
    else:
        path = out / RUN_DIR / "manifest.json"
        manifest = json.loads(path.read_text())
        del manifest["states"]["original_sha256"]
        path.write_text(json.dumps(manifest))
        one_error_line(cli(model4, out, *COMPENSATE), "manifest.json", "original-model states")


def test_model_wide_allocation_resumes_with_the_recorded_budgets(model4, tmp_path):
    ref = tmp_path / "ref"
    assert cli(model4, ref, "--allocation", "global").returncode == 0
    sola = json.loads((ref / "config.json").read_text())["sola"]
    assert abs(sola["achieved_ratio_blocks"] - 0.3) < 0.005
    survey = [r for r in read_log(ref) if r["event"] == "survey"]
    assert len(survey) == 1 and len(survey[0]["budgets"]) == 4
    kept = [r["kept_fraction"] for r in read_log(ref) if r["event"] == "block"]
    assert max(kept) - min(kept) > 0.01  # blocks traded parameters
    out = tmp_path / "out"
    r = cli(model4, out, "--allocation", "global", crash="block_committed:2")
    assert r.returncode == -signal.SIGKILL, r.stderr
    manifest = json.loads((out / RUN_DIR / "manifest.json").read_text())
    assert manifest["budgets"] == survey[0]["budgets"]
    r = cli(model4, out, "--allocation", "global")
    assert r.returncode == 0, r.stderr
    assert sum(e["event"] == "survey" for e in read_log(out)) == 1  # the resumed run did not survey again
    assert hashes(out) == hashes(ref)
    # a resume with the budgets gone is refused, not silently re-allocated
    out2 = tmp_path / "out2"
    cli(model4, out2, "--allocation", "global", crash="block_committed:2")
    path = out2 / RUN_DIR / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["budgets"]
    path.write_text(json.dumps(manifest))
    one_error_line(cli(model4, out2, "--allocation", "global"), "manifest.json", "budgets")


def test_several_ratios_in_one_run_share_the_survey(model4, tmp_path):
    out = tmp_path / "multi"
    r = cli(model4, out, "--allocation", "global", "--ratio", "0.2,0.4")
    assert r.returncode == 0, r.stderr
    for ratio, shared in (("0.2", False), ("0.4", True)):
        sola = json.loads((out / f"ratio-{ratio}" / "config.json").read_text())["sola"]
        assert abs(sola["achieved_ratio_blocks"] - float(ratio)) < 0.005
        survey = [e for e in read_log(out / f"ratio-{ratio}") if e["event"] == "survey"]
        assert len(survey) == 1 and survey[0]["shared"] is shared
    # a ratio of a multi-ratio run is the same output as that ratio alone
    single = tmp_path / "single"
    assert cli(model4, single, "--allocation", "global", "--ratio", "0.4").returncode == 0
    assert hashes(single) == hashes(out / "ratio-0.4")


def test_a_bad_ratio_in_a_list_is_refused_before_any_output(model4, tmp_path):
    out = tmp_path / "multi"
    one_error_line(cli(model4, out, "--ratio", "0.2,1.5"), "--ratio", "1.5")
    assert not out.exists()


def _lockstep_options(*extra: str) -> list[CompressOptions]:
    from sola_stream.cli import _options, build_parser
    args = build_parser().parse_args(["compress", "m", "o", *ARGS, *extra])
    return [_options(args, r) for r in args.ratio]


def test_propagated_original_states_feed_every_ratio_from_one_statistics_pass(model4, tmp_path):
    """--propagate original with several ratios: one statistics pass and one set of spectra per
    block and split for all of them (counted through sola_stream.phases), each output byte-identical to its ratio run alone, and a
    kill between two outputs' commits of one block resumes to the same bytes."""
    from sola_stream.phases import listening
    from sola_stream.pipeline.lockstep import applies, compress_lockstep
    extra = ("--propagate", "original", "--ratio", "0.2,0.4")
    options = _lockstep_options(*extra)
    assert applies(options) and not applies(_lockstep_options("--ratio", "0.2,0.4"))
    passes = []
    counted = ("statistics", "spectra", "prime split choice")
    outs = [str(tmp_path / "multi" / f"ratio-{r}") for r in ("0.2", "0.4")]
    with listening(lambda name, entering: passes.append(name) if entering and name in counted else None):
        summaries = compress_lockstep(str(model4), outs, options, progress=False)
    # per block: one statistics pass, and the spectra (7 layers) of the survey and of each candidate
    # split once, not once per ratio; the original block's outputs on the compared windows once
    # (tests/test_prime_split.py), then each output's candidates that its budget pays for
    splits = len(options[0].prime_choices)
    assert options[0].allocation == "global" and splits > 1
    assert passes.count("statistics") == 4 and passes.count("spectra") == 4 * (1 + splits) * 7
    assert 4 * (1 + splits) < passes.count("prime split choice") <= 4 * (1 + 2 * splits)
    assert [round(s.target_ratio, 2) for s in summaries] == [0.2, 0.4]
    for ratio in ("0.2", "0.4"):
        sola = json.loads((tmp_path / "multi" / f"ratio-{ratio}" / "config.json").read_text())["sola"]
        assert abs(sola["achieved_ratio_blocks"] - float(ratio)) < 0.005
        alone = tmp_path / f"alone-{ratio}"
        assert cli(model4, alone, "--propagate", "original", "--ratio", ratio).returncode == 0
        assert hashes(alone) == hashes(tmp_path / "multi" / f"ratio-{ratio}"), ratio
    # killed after block 1 is committed to the first output only: the outputs stand at different blocks
    out = tmp_path / "crashed"
    r = cli(model4, out, *extra, crash="block_committed:3")
    assert r.returncode == -signal.SIGKILL, r.stderr
    blocks = [len(json.loads((out / f"ratio-{r}" / RUN_DIR / "manifest.json").read_text())["blocks"])
              for r in ("0.2", "0.4")]
    assert blocks == [2, 1]
    r = cli(model4, out, *extra)
    assert r.returncode == 0, r.stderr
    for ratio in ("0.2", "0.4"):
        assert hashes(out / f"ratio-{ratio}") == hashes(tmp_path / f"alone-{ratio}"), ratio
        assert all(e.get("shared_statistics") for e in read_log(out / f"ratio-{ratio}") if e["event"] == "block")
    # a SIGTERM stops every output at the same block; the rerun completes them
    out = tmp_path / "stopped"
    r = cli(model4, out, *extra, crash="block_compressed:2:TERM")
    assert r.returncode == EXIT_INTERRUPTED, r.stderr
    assert "stopped after block 1 of 4" in r.stderr
    for ratio in ("0.2", "0.4"):
        assert len(json.loads((out / f"ratio-{ratio}" / RUN_DIR / "manifest.json").read_text())["blocks"]) == 2
    assert cli(model4, out, *extra).returncode == 0
    assert hashes(out / "ratio-0.4") == hashes(tmp_path / "alone-0.4")

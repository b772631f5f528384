"""Crash safety: kill -9 at many points, SIGTERM, locks; resumed output is byte-identical."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import make_tiny
from sola_stream.runstate import EXIT_INTERRUPTED, LOCK, RUN_DIR

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


def hashes(out) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}


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
    assert "resume" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    manifest = json.loads((out / RUN_DIR / "manifest.json").read_text())
    # the signal arrives while block 1 commits in the background; the main thread may already be
    # computing block 2, which then finishes and commits before the stop
    done = len(manifest["blocks"])
    assert done in (2, 3)
    assert not (out / "config.json").exists()
    r = cli(model4, out)
    assert r.returncode == 0 and f"resumed at block {done}" in r.stdout
    assert hashes(out) == reference


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


def test_lock_held_by_live_process_refuses_stale_lock_is_taken(model4, reference, tmp_path):
    out = tmp_path / "out"
    assert cli(model4, out, crash="block_committed:1").returncode == -signal.SIGKILL
    lock = out / RUN_DIR / LOCK
    assert not lock.exists() or json.loads(lock.read_text())["pid"]  # left by the killed process
    import socket

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        r = cli(model4, out)
        assert r.returncode == 2 and f"pid {sleeper.pid}" in r.stderr
    finally:
        sleeper.kill()
        sleeper.wait()
    r = cli(model4, out)  # the holder is gone: the lock is stale
    assert r.returncode == 0, r.stderr
    assert hashes(out) == reference

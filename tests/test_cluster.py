"""tools/slurm/compress.sbatch run as SLURM would: preempted (SIGTERM to the batch script), stopped
at a safe point, requeued through scontrol, run again; the output equals an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_tiny, output_hashes
from sola_stream.pipeline.resume import RUN_DIR
from sola_stream.storage.output import block_shard_name

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "slurm" / "compress.sbatch"
ARGS = ["--ratio", "0.3", "--nsamples", "6", "--seqlen", "48", "--batch-tokens", "96"]


@pytest.fixture(scope="module")
def model4(tmp_path_factory, tiny_tokenizer):
    return make_tiny("llama", tmp_path_factory.mktemp("m4") / "llama4", tiny_tokenizer, num_hidden_layers=4)


@pytest.fixture
def slurm(tmp_path):
    """The environment of a SLURM job, with an `scontrol` that records what it was asked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.log"
    fake = bin_dir / "scontrol"
    fake.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SOLA_STREAM_CRASH"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", SLURM_JOB_ID="4242",
               SOLA_STREAM=f"{sys.executable} -m sola_stream")
    return env, calls


def sbatch(env: dict, *args, wait: bool = True, **extra):
    cmd = ["bash", str(SCRIPT), *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, env={**env, **extra}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env={**env, **extra}, capture_output=True, text=True, timeout=600)


def test_preempted_job_requeues_and_resumes_to_identical_output(model4, slurm, tmp_path):
    env, calls = slurm
    reference = tmp_path / "reference"
    r = sbatch(env, model4, reference, *ARGS)
    assert r.returncode == 0, r.stderr
    assert not calls.exists()  # nothing to requeue

    out = tmp_path / "out"
    # block 0's shard is written, then the run pauses 2 s: the scheduler's SIGTERM lands there
    job = sbatch(env, model4, out, *ARGS, wait=False, SOLA_STREAM_CRASH_AT="block_written:1:SLEEP")
    deadline = time.time() + 300
    while not (out / block_shard_name(0)).exists():
        assert job.poll() is None and time.time() < deadline, job.communicate()
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)  # to the batch script, as --signal=B:TERM does
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 75, stderr
    assert "stopped at a safe point; requeueing job 4242" in stderr
    assert calls.read_text().split() == ["requeue", "4242"]
    manifest = json.loads((out / RUN_DIR / "manifest.json").read_text())
    assert 1 <= len(manifest["blocks"]) < 4 and not (out / "config.json").exists()

    r = sbatch(env, model4, out, *ARGS, SLURM_RESTART_COUNT="1")  # the requeued job: same command
    assert r.returncode == 0, r.stderr
    assert "resumed at block" in r.stdout
    assert output_hashes(out) == output_hashes(reference)
    assert calls.read_text().split() == ["requeue", "4242"]  # requeued once, not again


def test_array_task_takes_its_ratio_and_refuses_a_missing_one(model4, slurm, tmp_path):
    env, _ = slurm
    args = [a for a in ARGS if a not in ("--ratio", "0.3")]
    r = sbatch(env, model4, tmp_path / "runs", *args, "--ratio-list", "0.2,0.3", SLURM_ARRAY_TASK_ID="1")
    assert r.returncode == 0, r.stderr
    sola = json.loads((tmp_path / "runs" / "ratio-0.3" / "config.json").read_text())["sola"]
    assert sola["ratio"] == 0.3
    r = sbatch(env, model4, tmp_path / "runs", *args, "--ratio-list", "0.2,0.3", SLURM_ARRAY_TASK_ID="2")
    assert r.returncode == 2 and "--ratio-list has 2 ratios" in r.stderr
    r = sbatch(env, model4)
    assert r.returncode == 2 and r.stderr.startswith("usage:")


NODES_SCRIPT = SCRIPT.parent / "compress-nodes.sbatch"


@pytest.fixture
def slurm_nodes(slurm, tmp_path):
    """As `slurm`, with an `srun` that runs its command here and an `scontrol show hostnames`."""
    env, calls = slurm
    bin_dir = Path(env["PATH"].split(os.pathsep)[0])
    (bin_dir / "srun").write_text('#!/bin/sh\nshift\nexec "$@"\n')  # drops --kill-on-bad-exit
    (bin_dir / "scontrol").write_text(
        f'#!/bin/sh\nif [ "$1" = show ]; then echo 127.0.0.1; else echo "$@" >> "{calls}"; fi\n')
    for name in ("srun", "scontrol"):
        (bin_dir / name).chmod(0o755)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env.update(SOLA_TORCHRUN=f"{sys.executable} -m torch.distributed.run", SOLA_NPROC="2", SOLA_PORT=str(port),
               SLURM_NNODES="1", SLURM_JOB_NODELIST="node1")
    return env, calls


def test_several_ranks_job_stops_on_request_requeues_and_resumes(model4, slurm_nodes, tmp_path):
    """compress-nodes.sbatch: torchrun's ranks stop at the stop request the script makes on SIGTERM,
    the script turns torchrun's exit 1 into 75 from the run log and requeues; the rerun finishes
    into the bytes of an uninterrupted job."""
    env, calls = slurm_nodes
    args = [*ARGS, "--device", "cpu"]
    reference = tmp_path / "reference"
    r = subprocess.run(["bash", str(NODES_SCRIPT), model4, reference, *args], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not calls.exists()

    out = tmp_path / "out"
    job = subprocess.Popen(["bash", str(NODES_SCRIPT), model4, out, *args], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True,
                           env={**env, "SOLA_STREAM_CRASH_AT": "block_compressed:1:SLEEP"})
    log, deadline = out / "sola-stream-log.jsonl", time.time() + 300
    while not (log.exists() and '"survey"' in log.read_text()):  # the stop lands in block 0 (paused there)
        assert job.poll() is None and time.time() < deadline, job.communicate()
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 75, stderr[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    manifest = json.loads((out / RUN_DIR / "manifest.json").read_text())
    assert len(manifest["blocks"]) == 1 and manifest["ranks"] == 2
    assert not (out / RUN_DIR / "stop").exists()  # obeyed, so the rerun goes on

    r = subprocess.run(["bash", str(NODES_SCRIPT), model4, out, *args], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert output_hashes(out) == output_hashes(reference)
    assert calls.read_text().split() == ["requeue", "4242"]

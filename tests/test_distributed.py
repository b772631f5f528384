"""Data-parallel compression on torch.distributed (gloo, 2 processes on CPU): statistics summed
over the ranks equal one process's over all windows; the whole compress command on two ranks
against one process; a stop asked of one rank, a resume, and errors of one rank are every rank's."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny, output_hashes
from sola_stream.errors import InputError
from sola_stream.pipeline.distributed import Ranks

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
sys.path.insert(0, str(WORKER.parent))
from distributed_worker import calibration_windows, statistics  # noqa: E402
from bench_ranks import effective  # noqa: E402  (tools/: every layer's weight as it acts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_tokenizer):
    return make_tiny("llama", tmp_path_factory.mktemp("dist") / "llama", tiny_tokenizer, num_hidden_layers=1)


def test_two_ranks_sum_to_the_statistics_of_one_process(model, tmp_path):
    port, world = free_port(), 2
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world)}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(model), str(tmp_path)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    got = [torch.load(tmp_path / f"rank-{r}.pt") for r in range(world)]
    assert [g["share"] for g in got] == [(0, 3), (3, 7)]  # 7 windows: contiguous shares
    single = statistics(str(model), calibration_windows())
    for g in got:
        assert g["tokens"] == single.tokens
        assert g["stop"] is True  # the last rank asked; every rank stops
        for key, cov in single.cov.items():  # float32 sums in another order: equal to the matrix's scale
            torch.testing.assert_close(g["cov"][key], cov, rtol=1e-5, atol=1e-6 * float(cov.abs().max()))
        for key, s in single.neuron_scores().items():
            torch.testing.assert_close(g["scores"][key], s, rtol=1e-5, atol=1e-7)
    # the reduced statistics are bit-identical on every rank: the same decompositions follow
    for key in single.cov:
        assert torch.equal(got[0]["cov"][key], got[1]["cov"][key])


def test_environment_is_checked(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert Ranks.from_env() == Ranks() and not Ranks().active
    assert Ranks().share(5) == range(0, 5) and Ranks().agree(True)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(InputError, match="WORLD_SIZE='two' is not an integer"):
        Ranks.from_env()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(InputError, match="do not describe a rank"):
        Ranks.from_env()
    with pytest.raises(InputError, match="fewer calibration windows than the 4 ranks"):
        Ranks(0, 4).share(3)
    monkeypatch.delenv("MASTER_ADDR", raising=False)  # a rank started by hand, not by torchrun
    with pytest.raises(InputError, match="MASTER_ADDR expected.*launch it with torchrun"):
        Ranks(0, 2).init("cpu")


# -- the whole compress command on two ranks -------------------------------------------------------

ARGS = ["--nsamples", "8", "--seqlen", "64", "--device", "cpu", "--no-progress"]


def launch(model: Path, out: Path, *extra: str, world: int = 2, env_by_rank: dict | None = None) -> list:
    """`sola-stream compress` as `world` processes with the environment torchrun gives each rank
    (launched directly, so that each rank's exit code and stderr are its own)."""
    port = free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
           "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "sola_stream", "compress", str(model), str(out), *ARGS, *extra],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r), **(env_by_rank or {}).get(r, {})},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    return [(p.wait(timeout=300), p.communicate()[1]) for p in procs]


def single(model: Path, out: Path, *extra: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-m", "sola_stream", "compress", str(model), str(out), *ARGS,
                           "--threads", "1", *extra], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def three_blocks(tmp_path_factory, tiny_tokenizer):
    return make_tiny("llama", tmp_path_factory.mktemp("dist3") / "llama", tiny_tokenizer, num_hidden_layers=3)


@pytest.mark.parametrize("flags", [("--allocation", "global"), ("--allocation", "block"),
                                   ("--allocation", "global", "--prime-ratio", "0.25"),
                                   ("--prime-ratio", "auto", "--nsamples", "3")])
def test_two_ranks_compress_as_one_process(three_blocks, tmp_path, flags):
    """The output of two ranks is one process's to the float32 order of the statistics' sums (and
    bf16 storage); the same ranks and, under --prime-ratio auto (the default), the same splits
    everywhere: each rank measures its share of the first windows and the errors are summed (with
    3 windows both ranks hold some); rank 0 alone wrote the output."""
    single(three_blocks, tmp_path / "one", *flags)
    ranks = launch(three_blocks, tmp_path / "two", *flags)
    assert [rc for rc, _ in ranks] == [0, 0], ranks
    one, two = (json.loads((tmp_path / d / "config.json").read_text())["sola"] for d in ("one", "two"))
    assert [b["layers"] for b in one["blocks"]] == [b["layers"] for b in two["blocks"]]
    assert [b.get("prime_split") for b in one["blocks"]] == [b.get("prime_split") for b in two["blocks"]]
    assert one["achieved_ratio_blocks"] == two["achieved_ratio_blocks"]
    a, b = effective(tmp_path / "one"), effective(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:  # bf16 storage: a relative step of 2^-8 where a sum order moved a value across it; the
        # last block's factors also carry the earlier blocks' differences (measured up to 1.3%)
        assert float((a[k] - b[k]).norm() / a[k].norm()) < 2e-2, k
    log = [json.loads(line) for line in (tmp_path / "two" / "sola-stream-log.jsonl").read_text().splitlines()]
    assert log[0]["ranks"] == 2 and log[-1]["event"] == "done"
    assert not (tmp_path / "two" / ".sola-run").exists()


def test_a_stop_asked_of_one_rank_stops_both_and_resumes(three_blocks, tmp_path):
    """SIGTERM to rank 1 alone in the survey's first block: both ranks stop there (exit 75);
    rerun, SIGTERM to rank 1 alone after block 0: both ranks stop after block 0 is committed, the
    run resumes with two ranks into the bytes of an uninterrupted run; one rank is refused."""
    full = launch(three_blocks, tmp_path / "full")
    assert [rc for rc, _ in full] == [0, 0], full
    out = tmp_path / "out"
    stopped = launch(three_blocks, out, env_by_rank={1: {"SOLA_STREAM_CRASH_AT": "survey_block:1:TERM"}})
    assert [rc for rc, _ in stopped] == [75, 75], stopped
    assert "stopped in the survey pass after block 0 of 3" in stopped[0][1]
    stopped = launch(three_blocks, out, env_by_rank={1: {"SOLA_STREAM_CRASH_AT": "block_compressed:1:TERM"}})
    assert [rc for rc, _ in stopped] == [75, 75], stopped
    assert "SIGTERM received" in stopped[1][1] and "stopped after block 0 of 3" in stopped[0][1]
    manifest = json.loads((out / ".sola-run" / "manifest.json").read_text())
    assert len(manifest["blocks"]) == 1 and manifest["ranks"] == 2 and len(manifest["states"]["sha256"]) == 2
    assert sorted(p.name for p in (out / ".sola-run").glob("states-*")) == [
        "states-00001-rank0of2.safetensors", "states-00001-rank1of2.safetensors"]

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    alone = subprocess.run([sys.executable, "-m", "sola_stream", "compress", str(three_blocks), str(out), *ARGS],
                           env=env, capture_output=True, text=True, timeout=300)
    assert alone.returncode == 2 and "started with 2 process(es), not 1" in alone.stderr

    resumed = launch(three_blocks, out)
    assert [rc for rc, _ in resumed] == [0, 0], resumed
    assert output_hashes(out) == output_hashes(tmp_path / "full")


def test_a_damaged_states_file_of_rank_1_stops_every_rank(three_blocks, tmp_path):
    out = tmp_path / "out"
    stopped = launch(three_blocks, out, env_by_rank={0: {"SOLA_STREAM_CRASH_AT": "block_compressed:2:TERM"}})
    assert [rc for rc, _ in stopped] == [75, 75], stopped
    path = out / ".sola-run" / "states-00002-rank1of2.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    failed = launch(three_blocks, out)
    assert [rc for rc, _ in failed] == [2, 2], failed
    for _, err in failed:  # the same one line on both ranks, naming the file
        assert f"{path}: calibration states damaged" in err.strip().splitlines()[-1]


@pytest.mark.parametrize("allocation", ["global", "block"])
def test_states_that_overflow_stop_every_rank_with_one_message(tiny_tokenizer, tmp_path, allocation):
    """Finite weights whose outputs overflow (block 0's down projection): every rank finds it in
    its own windows, in the survey or after the compressed block, and both print the same line."""
    from safetensors.torch import load_file, save_file

    model = make_tiny("llama", tmp_path / "llama", tiny_tokenizer, num_hidden_layers=2)
    name = "model.layers.0.mlp.down_proj.weight"
    shard = model / json.loads((model / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(str(shard))
    tensors[name] = torch.full_like(tensors[name], 3e38)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    failed = launch(model, tmp_path / "out", "--allocation", allocation)
    assert [rc for rc, _ in failed] == [2, 2], failed
    lines = [err.strip().splitlines()[-1] for _, err in failed]
    assert lines[0].startswith("sola-stream: error: calibration states") and "block 0" in lines[0]
    assert "NaN or Inf" in lines[0] and ("survey pass" in lines[0]) == (allocation == "global")
    assert lines[1] == lines[0]  # the lowest rank's error, raised on every rank


def test_torchrun_runs_it(three_blocks, tmp_path):
    """The launcher users run: torchrun starts the ranks (gloo on the CPU) and the output is complete."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), "-m", "sola_stream", "compress", str(three_blocks),
                           str(tmp_path / "out"), *ARGS], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "shared by 2 ranks" in done.stdout
    assert json.loads((tmp_path / "out" / "config.json").read_text())["sola"]["achieved_ratio_blocks"] > 0.19

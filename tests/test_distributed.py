"""Data-parallel steps on torch.distributed (gloo, 2 processes on CPU): statistics summed over the
ranks equal one process's over all windows; a stop request of one rank is every rank's."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny
from sola_stream.errors import InputError
from sola_stream.pipeline.distributed import Ranks

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
sys.path.insert(0, str(WORKER.parent))
from distributed_worker import calibration_windows, statistics  # noqa: E402


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

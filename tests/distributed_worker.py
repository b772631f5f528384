"""One rank of tests/test_distributed.py, started with the environment torchrun sets (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): block 0's statistics over this rank's share of
the calibration windows, summed over the ranks, saved to OUT/rank-R.pt.

    python tests/distributed_worker.py MODEL OUT
"""
import sys
from pathlib import Path

import torch

from sola_stream.nn.build import build_block
from sola_stream.pipeline.block_forward import BlockStats, run_block
from sola_stream.pipeline.distributed import Ranks
from sola_stream.pipeline.engine import embed_windows
from sola_stream.pipeline.skeleton import Skeleton
from sola_stream.storage.checkpoint import CheckpointReader


def statistics(model: str, windows: torch.Tensor) -> BlockStats:
    skeleton = Skeleton(CheckpointReader(model))
    states, kwargs = embed_windows(skeleton, windows, 2)
    family = skeleton.family
    block = build_block(skeleton.meta_block(0), skeleton.reader.tensors(family.block_prefix(0)), None, "cpu",
                        torch.float32)
    stats = BlockStats(block, family, stop_early=True)
    run_block(block, states, kwargs[0], "cpu", 2, out=None)
    stats.remove()
    return stats


def calibration_windows() -> torch.Tensor:
    return torch.randint(5, 200, (7, 32), generator=torch.Generator().manual_seed(0))


def main() -> None:
    model, out = sys.argv[1], Path(sys.argv[2])
    ranks = Ranks.from_env()
    ranks.init("cpu")
    torch.set_num_threads(1)
    windows = calibration_windows()
    share = ranks.share(len(windows))
    stats = statistics(model, windows[share.start:share.stop])
    ranks.sum_statistics(stats.cov, stats.abs_sum, stats.tokens)
    stop = ranks.agree(ranks.rank == ranks.world - 1)  # only the last rank asks to stop
    torch.save({"cov": stats.cov, "scores": stats.neuron_scores(), "tokens": stats.tokens, "stop": stop,
                "share": (share.start, share.stop)}, out / f"rank-{ranks.rank}.pt")


if __name__ == "__main__":
    main()

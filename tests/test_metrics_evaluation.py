"""Evaluators' helpers: samples gathered over DDP ranks."""

import torch
import torch.multiprocessing as mp

from dmd_lightning.metrics.evaluation import gather_samples


def _gather_worker(rank, world_size, port, out):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size)
    gathered = gather_samples(torch.full((rank + 1, 2), rank, dtype=torch.uint8))
    out[rank] = gathered.tolist()
    torch.distributed.destroy_process_group()


def test_gather_samples():
    x = torch.arange(4)
    assert gather_samples(x) is x  # no process group: unchanged
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.start_processes(_gather_worker, args=(2, port, out), nprocs=2, start_method="fork")
    assert out[0] == out[1] == [[0, 0], [1, 1], [1, 1]]

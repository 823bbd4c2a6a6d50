"""Data-parallel training of a stage: 2 processes, gloo, DistributedDataParallel.

Each rank takes one training step on its own batch with the real loss (v-MSE + physics
term) through the DDP wrapper. Both ranks must end with bit-identical parameters, equal to
a single-process step on the average of the two ranks' losses (what DDP's gradient
all-reduce computes).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from xct_core.config import Params, params_from_dict
from xct_core.diffusion import CosineSchedule
from xct_core.losses import PhysicsLoss, diffusion_loss
from xct_core.models import build_stage

WORLD = 2
PHYSICS_WEIGHT = 0.1
LR = 0.05


def _params() -> Params:
    return params_from_dict({
        "drr": {"geometry": "cone", "pixels": 32, "pixel_mm": 19.2},
        "stages": {"stage1": {"size": 16, "token_grid": 4, "conv_channels": [8, 16], "dim": 32, "depth": 1,
                              "heads": 2, "lift_channels": 4, "enc_channels": [8, 16]}},
    })


def _batch(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + rank)
    return (torch.rand(2, 1, 16, 16, 16, generator=g) * 2 - 1, torch.rand(2, 1, 32, 32, generator=g) * 6,
            torch.rand(2, 1, 32, 32, generator=g) * 6)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_stage(_params(), 1)
    with torch.no_grad():  # wake the zero-initialised gates so every parameter gets a gradient
        g = torch.Generator().manual_seed(1)
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net


def _loss(model: torch.nn.Module, rank: int) -> torch.Tensor:
    x0, f, lat = _batch(rank)
    loss, _ = diffusion_loss(model, x0, f, lat, schedule=CosineSchedule(1000), generator=torch.Generator().manual_seed(rank),
                             physics_weight=PHYSICS_WEIGHT, physics=PhysicsLoss.from_params(_params(), 1))
    return loss


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = DDP(_model())
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        loss = _loss(model, rank)  # forward through the wrapper (never model.module)
        loss.backward()
        opt.step()
        torch.save({k: v.detach().clone() for k, v in model.module.state_dict().items()}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(300)
def test_two_process_ddp_step_keeps_ranks_identical(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), f"ranks differ in {k}"

    # single-process reference: the mean of both ranks' losses, one SGD step
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = _model()
        start = {k: v.clone() for k, v in ref.state_dict().items()}
        opt = torch.optim.SGD(ref.parameters(), lr=LR)
        (sum(_loss(ref, r) for r in range(WORLD)) / WORLD).backward()
        opt.step()
    finally:
        torch.set_num_threads(threads)
    moved = 0
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(states[0][k], v, rtol=1e-4, atol=1e-6, msg=f"DDP step differs from reference in {k}")
        moved += int(not torch.equal(v, start[k]))
    assert moved > 0.9 * len(start)  # the step really changed (almost) every tensor

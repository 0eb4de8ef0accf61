"""create_ddp_model: CPU models are wrapped without device_ids and gradients are averaged."""

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from megdet_d2.engine import create_ddp_model
from tests.utils.dist import run_distributed


def _wrap_and_step(rank, world_size):
    torch.manual_seed(0)
    model = create_ddp_model(nn.Linear(3, 1, bias=False), broadcast_buffers=False)
    model(torch.full((1, 3), float(rank + 1))).sum().backward()
    return isinstance(model, DistributedDataParallel), model.module.weight.grad.tolist()


def test_cpu_model_is_wrapped_and_gradients_are_averaged():
    (wrapped0, grad0), (wrapped1, grad1) = run_distributed(_wrap_and_step, world_size=2)
    assert wrapped0 and wrapped1
    assert grad0 == grad1 == [[1.5, 1.5, 1.5]]


def test_single_process_returns_the_model_itself():
    model = nn.Linear(3, 1)
    assert create_ddp_model(model) is model

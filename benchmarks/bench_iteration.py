"""Whole training iteration with CGBN vs plain (per-process) BN: tiny R18-FPN, 2 CPU processes.

Builds the quickstart detector (``configs/quickstart/shapes_R18_FPN.yaml``) once per norm in
every process, wraps each in DDP as the trainer does, and times forward + backward + SGD step
on the same pre-loaded batches, the variants taking turns within each iteration so load bursts
on a shared machine hit them alike. Prints medians and the overhead of each norm over BN.

``BNAR`` is the communication floor of any synchronised BN: plain BN that also runs a bare
``all_reduce`` of 2C+1 values over CGBN's group in forward and 2C in backward, as CGBN does,
but computes nothing with them. CGBN's own cost is its time over that floor. ``ARs alone`` runs
the same all-reduces back to back with no model at all: the least any design with one
collective each way per layer can add to BN's iteration.

    python benchmarks/bench_iteration.py --iters 30 --warmup 5
"""

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from detectron2.config import get_cfg
from detectron2.data import build_detection_train_loader
from detectron2.engine import launch
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.utils import comm
from detectron2.utils.events import EventStorage

from megdet_d2 import add_megdet_config
from megdet_d2.data import register_quickstart_datasets
from megdet_d2.engine import create_ddp_model, setup_cgbn_groups
from megdet_d2.layers import CGBN, NORM_REGISTRY, get_cgbn_group

CONFIG = os.path.join(
    os.path.dirname(__file__), "..", "configs", "quickstart", "shapes_R18_FPN.yaml"
)
NORMS = ("BN", "BNAR", "CGBN", "naiveSyncBN")


class _BareAllReduce(torch.autograd.Function):
    """Identity whose forward and backward each run one all_reduce of CGBN's payload size."""

    @staticmethod
    def forward(ctx, x, channels):
        ctx.channels = channels
        dist.all_reduce(torch.zeros(2 * channels + 1, dtype=torch.float64), group=get_cgbn_group())
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        dist.all_reduce(torch.zeros(2 * ctx.channels), group=get_cgbn_group())
        return grad, None


@NORM_REGISTRY.register()
class BNAR(nn.BatchNorm2d):
    """Per-process BN plus CGBN's two collectives: the communication floor."""

    def forward(self, x):
        return super().forward(_BareAllReduce.apply(x, self.num_features))


def build_cfg(norm, opts):
    cfg = get_cfg()
    add_megdet_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(opts)
    cfg.MODEL.RESNETS.NORM = cfg.MODEL.FPN.NORM = norm
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def worker(args):
    torch.set_num_threads(1)
    cfgs = {norm: build_cfg(norm, args.opts) for norm in NORMS}
    register_quickstart_datasets(cfgs["BN"])
    setup_cgbn_groups(cfgs["CGBN"])
    loader = iter(build_detection_train_loader(cfgs["BN"]))
    batches = [next(loader) for _ in range(args.warmup + args.iters)]
    steps = {}
    for norm, cfg in cfgs.items():
        torch.manual_seed(0)
        model = build_model(cfg)
        optimizer = build_optimizer(cfg, model)
        steps[norm] = (create_ddp_model(model, broadcast_buffers=False), optimizer)
    channels = [m.num_features for m in steps["CGBN"][0].modules() if isinstance(m, CGBN)]
    payloads = [torch.zeros(2 * c + 1, dtype=torch.float64) for c in channels]
    payloads += [torch.zeros(2 * c) for c in reversed(channels)]
    runs = {norm: _train_step(model, optimizer) for norm, (model, optimizer) in steps.items()}
    runs["ARs alone"] = lambda batch: [dist.all_reduce(p, group=get_cgbn_group()) for p in payloads]
    times = {name: [] for name in runs}
    with EventStorage(0):
        for i, batch in enumerate(batches):
            for name, run in runs.items():
                dist.barrier()
                start = time.perf_counter()
                run(batch)
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    # The slower rank sets the pace of a synchronous job.
    medians = torch.tensor([statistics.median(t) for t in times.values()], dtype=torch.float64)
    dist.all_reduce(medians, op=dist.ReduceOp.MAX)
    if comm.is_main_process():
        _print_table(dict(zip(times, medians.tolist())), len(payloads), args)


def _train_step(model, optimizer):
    def run(batch):
        loss = sum(model(batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return run


def _print_table(medians, num_collectives, args):
    base, floor = medians["BN"], medians["BNAR"]
    print(f"\n{args.iters} timed iterations (median, slowest rank), 2 processes x 2 images\n")
    print("| norm (backbone + FPN) | ms / iteration | vs BN | vs BNAR (floor) |")
    print("|---|---|---|---|")
    for norm in NORMS:
        t = medians[norm]
        print(
            f"| {norm} | {1000 * t:.0f} | {100 * (t / base - 1):+.1f}% | "
            f"{100 * (t / floor - 1):+.1f}% |"
        )
    alone = medians["ARs alone"]
    print(
        f"\nARs alone: {num_collectives} bare all-reduces back to back, no model: "
        f"{1000 * alone:.1f} ms = {100 * alone / base:.1f}% of the BN iteration"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args()
    launch(worker, 2, dist_url="auto", args=(args,))


if __name__ == "__main__":
    main()

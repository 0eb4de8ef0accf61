"""Whole training iteration with CGBN vs plain (per-process) BN: tiny R18-FPN, 2 CPU processes.

Builds the quickstart detector (``configs/quickstart/shapes_R18_FPN.yaml``) once per norm in
every process, wraps each in DDP as the trainer does, and times forward + backward + SGD step
on the same pre-loaded batches, the variants taking turns within each iteration so load bursts
on a shared machine hit them alike. Prints medians and the overhead of each norm over BN.

    python benchmarks/bench_iteration.py --iters 30 --warmup 5
"""

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
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

CONFIG = os.path.join(
    os.path.dirname(__file__), "..", "configs", "quickstart", "shapes_R18_FPN.yaml"
)
NORMS = ("BN", "CGBN", "naiveSyncBN")


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
    times = {norm: [] for norm in NORMS}
    with EventStorage(0):
        for i, batch in enumerate(batches):
            for norm, (model, optimizer) in steps.items():
                dist.barrier()
                start = time.perf_counter()
                loss = sum(model(batch).values())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if i >= args.warmup:
                    times[norm].append(time.perf_counter() - start)
    # The slower rank sets the pace of a synchronous job.
    medians = torch.tensor([statistics.median(times[n]) for n in NORMS], dtype=torch.float64)
    dist.all_reduce(medians, op=dist.ReduceOp.MAX)
    if comm.is_main_process():
        base = medians[0].item()
        print(f"\n{args.iters} timed iterations (median, slowest rank), 2 processes x 2 images\n")
        print("| norm (backbone + FPN) | ms / iteration | vs BN |\n|---|---|---|")
        for norm, t in zip(NORMS, medians.tolist()):
            print(f"| {norm} | {1000 * t:.0f} | {100 * (t / base - 1):+.1f}% |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args()
    launch(worker, 2, dist_url="auto", args=(args,))


if __name__ == "__main__":
    main()

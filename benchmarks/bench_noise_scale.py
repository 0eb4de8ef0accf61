"""Cost of the gradient noise scale (``MEGDET.NOISE_SCALE``): tiny R18-FPN, 2 CPU processes.

Builds the quickstart detector (``configs/quickstart/shapes_R18_FPN.yaml``, CGBN) three times in
every process with the same weights, wraps each in DDP as the trainer does, and times forward +
backward + SGD step on the same pre-loaded batches: ``off`` (no hook), ``on`` (the comm hook and
``NoiseScaleHook`` as the trainer runs them, one all-reduce every ``--log-period`` iterations)
and ``on, log every it.`` (the all-reduce every iteration: the worst case). The variants take turns
within each iteration, so load bursts on a shared machine hit them alike. Whole-iteration
differences of a few percent are within the noise of a loaded 2-core machine, so the hook's own
work is also timed directly: ``after_backward`` + ``after_step`` (|G_B|², EMA, the all-reduce),
and the comm hook's extra work (one float64 norm over the gradients, timed on the same tensors).

    python benchmarks/bench_noise_scale.py --iters 40 --warmup 5
"""

import argparse
import os
import statistics
import time
import types

import torch
import torch.distributed as dist
from detectron2.config import get_cfg
from detectron2.data import build_detection_train_loader
from detectron2.engine import launch
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.utils import comm
from detectron2.utils.events import EventStorage
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from megdet_d2 import add_megdet_config
from megdet_d2.data import register_quickstart_datasets
from megdet_d2.engine import create_ddp_model, setup_cgbn_groups
from megdet_d2.engine.hooks import NoiseScaleHook

CONFIG = os.path.join(
    os.path.dirname(__file__), "..", "configs", "quickstart", "shapes_R18_FPN.yaml"
)
VARIANTS = ("off", "torch's allreduce_hook", "on", "on, log every it.", "off, again")


def build_cfg(opts):
    cfg = get_cfg()
    add_megdet_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(opts)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def _model(name, cfg, args, storage, total):
    """The DDP model of a variant, and its NoiseScaleHook (None without)."""
    torch.manual_seed(0)
    model = create_ddp_model(build_model(cfg), broadcast_buffers=False)
    if name == "torch's allreduce_hook":  # the cost of any Python comm hook, without a norm
        model.register_comm_hook(None, default_hooks.allreduce_hook)
    if not name.startswith("on"):
        return model, None
    batch = cfg.SOLVER.IMS_PER_BATCH
    period = args.log_period if name == "on" else 1
    hook = NoiseScaleHook(batch // comm.get_world_size(), batch, period=period)
    hook.trainer = types.SimpleNamespace(model=model, iter=0, max_iter=total, storage=storage)
    hook.before_train()  # registers the comm hook
    return model, hook


def worker(args):
    torch.set_num_threads(1)
    cfg = build_cfg(args.opts)
    register_quickstart_datasets(cfg)
    setup_cgbn_groups(cfg)
    loader = iter(build_detection_train_loader(cfg))
    total = args.warmup + args.iters
    batches = [next(loader) for _ in range(total)]
    storage = EventStorage(0)
    runs = {}
    for name in VARIANTS:
        model, hook = _model(name, cfg, args, storage, total)
        runs[name] = (model, build_optimizer(cfg, model), hook)
    times = {name: [] for name in VARIANTS}
    own = {(name, part): [] for name in ("on", "on, log every it.") for part in ("ab", "as")}
    with storage:
        for i, data in enumerate(batches):
            storage.iter = i
            for name, (model, optimizer, hook) in runs.items():
                dist.barrier()
                start = time.perf_counter()
                loss = sum(model(data).values())
                optimizer.zero_grad()
                loss.backward()
                if hook is not None:
                    hook.trainer.iter = i
                    t0 = time.perf_counter()
                    hook.after_backward()
                    t1 = time.perf_counter()
                optimizer.step()
                if hook is not None:
                    t2 = time.perf_counter()
                    hook.after_step()
                    t3 = time.perf_counter()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
                    if hook is not None:
                        own[name, "ab"].append(t1 - t0)
                        own[name, "as"].append(t3 - t2)
            if i >= args.warmup:  # the comm hook's extra work: a norm over the local gradients
                grads = [p.grad for p in runs["off"][0].parameters() if p.grad is not None]
                t0 = time.perf_counter()
                sum(
                    torch.linalg.vector_norm(g, dtype=torch.float32).double().square()
                    for g in grads
                )
                own["norm", ""] = own.get(("norm", ""), []) + [time.perf_counter() - t0]
    # The slower rank sets the pace of a synchronous job; after_step: the mean (the all-reduce
    # of one iteration in LOG_PERIOD, amortised).
    keys = list(times) + list(own)
    values = [statistics.median(times[k]) for k in times]
    values += [(statistics.mean if k[1] == "as" else statistics.median)(own[k]) for k in own]
    medians = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(medians, op=dist.ReduceOp.MAX)
    if comm.is_main_process():
        _print_table(dict(zip(keys, medians.tolist())), args)


def _print_table(ms, args):
    base = ms["off"]
    print(
        f"\n{args.iters} timed iterations (median, slowest rank), 2 processes x 2 images, "
        f"CGBN, MEGDET.LOG_PERIOD {args.log_period}\n"
    )
    print("| variant | ms / iteration | vs off |")
    print("|---|---|---|")
    for name in VARIANTS:
        print(f"| {name} | {1000 * ms[name]:.0f} | {100 * (ms[name] / base - 1):+.1f}% |")
    norm = ms["norm", ""]
    print("\nThe hook's own work, timed directly (ms; % of the 'off' iteration):\n")
    print("| | comm hook's norms | after_backward | after_step (all-reduce) | total |")
    print("|---|---|---|---|---|")
    for name in ("on", "on, log every it."):
        parts = [norm, ms[name, "ab"], ms[name, "as"]]
        cells = " | ".join(f"{1000 * t:.1f} ({100 * t / base:.2f}%)" for t in parts + [sum(parts)])
        print(f"| {name} | {cells} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--log-period", type=int, default=20, help="MEGDET.LOG_PERIOD")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args()
    launch(worker, 2, dist_url="auto", args=(args,))


if __name__ == "__main__":
    main()

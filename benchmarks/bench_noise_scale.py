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

from megdet_d2 import add_megdet_config
from megdet_d2.data import register_quickstart_datasets
from megdet_d2.engine import NoiseScaleHook, create_ddp_model, setup_cgbn_groups

CONFIG = os.path.join(
    os.path.dirname(__file__), "..", "configs", "quickstart", "shapes_R18_FPN.yaml"
)
VARIANTS = ("off", "on", "on, log every it.")


def build_cfg(opts):
    cfg = get_cfg()
    add_megdet_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(opts)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def worker(args):
    torch.set_num_threads(1)
    cfg = build_cfg(args.opts)
    register_quickstart_datasets(cfg)
    setup_cgbn_groups(cfg)
    loader = iter(build_detection_train_loader(cfg))
    total = args.warmup + args.iters
    batches = [next(loader) for _ in range(total)]
    batch = cfg.SOLVER.IMS_PER_BATCH
    storage = EventStorage(0)
    runs, hooks = {}, {}
    for name in VARIANTS:
        torch.manual_seed(0)
        model = create_ddp_model(build_model(cfg), broadcast_buffers=False)
        if name != "off":
            period = args.log_period if name == "on" else 1
            hook = NoiseScaleHook(batch // comm.get_world_size(), batch, period=period)
            hook.trainer = types.SimpleNamespace(
                model=model, iter=0, max_iter=total, storage=storage
            )
            hook.before_train()  # registers the comm hook
            hooks[name] = hook
        runs[name] = (model, build_optimizer(cfg, model))
    times = {name: [] for name in VARIANTS}
    hook_times = {name: [] for name in hooks}
    norm_times = []
    with storage:
        for i, data in enumerate(batches):
            storage.iter = i
            for name, (model, optimizer) in runs.items():
                hook = hooks.get(name)
                dist.barrier()
                start = time.perf_counter()
                loss = sum(model(data).values())
                optimizer.zero_grad()
                loss.backward()
                own = 0.0
                if hook is not None:
                    hook.trainer.iter = i
                    t = time.perf_counter()
                    hook.after_backward()
                    own = time.perf_counter() - t
                optimizer.step()
                if hook is not None:
                    t = time.perf_counter()
                    hook.after_step()
                    own += time.perf_counter() - t
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
                    if hook is not None:
                        hook_times[name].append(own)
            if i >= args.warmup:  # the comm hook's extra work: a norm over the local gradients
                grads = [p.grad for p in runs["off"][0].parameters() if p.grad is not None]
                t = time.perf_counter()
                sum(
                    torch.linalg.vector_norm(g, dtype=torch.float32).double().square()
                    for g in grads
                )
                norm_times.append(time.perf_counter() - t)
    # The slower rank sets the pace of a synchronous job.
    values = [statistics.median(times[n]) for n in VARIANTS]
    values += [statistics.mean(hook_times[n]) for n in hooks]  # mean: the all-reduce amortised
    values.append(statistics.median(norm_times))
    medians = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(medians, op=dist.ReduceOp.MAX)
    if comm.is_main_process():
        medians = medians.tolist()
        _print_table(dict(zip(VARIANTS, medians)), dict(zip(hooks, medians[3:5])), medians[5], args)


def _print_table(medians, own, norm, args):
    base = medians["off"]
    print(
        f"\n{args.iters} timed iterations (median, slowest rank), 2 processes x 2 images, "
        f"CGBN, MEGDET.LOG_PERIOD {args.log_period}\n"
    )
    print("| MEGDET.NOISE_SCALE | ms / iteration | vs off | hook's own work, ms | own / off |")
    print("|---|---|---|---|---|")
    for name in VARIANTS:
        t = medians[name]
        work = own.get(name)
        cells = (
            f"{1000 * (work + norm):.2f} | {100 * (work + norm) / base:.2f}%" if work else "– | –"
        )
        print(f"| {name} | {1000 * t:.0f} | {100 * (t / base - 1):+.1f}% | {cells} |")
    print(
        f"\nhook's own work = after_backward + after_step ({1000 * own['on']:.2f} ms at LOG_PERIOD "
        f"{args.log_period}) + the comm hook's norm over the local gradients ({1000 * norm:.2f} ms)"
    )


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

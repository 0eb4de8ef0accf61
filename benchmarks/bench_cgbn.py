"""Forward + backward time per BN layer: CGBN vs plain BatchNorm2d, NaiveSyncBatchNorm, all_reduce.

Spawns 2 processes (gloo on 127.0.0.1, one thread each; or NCCL with ``--device cuda`` and
2 GPUs) and times each layer at the R50-FPN shapes with N=2 images per process. Prints a
markdown table of medians (ms, slowest rank) and the ratios

* CGBN / BN: cost of synchronisation over the unsynchronised compute floor,
* CGBN / (BN + 2 x all_reduce): against compute floor + one collective each way (target <= 1),
* CGBN / BN+2AR: against plain BN run with a bare all_reduce after forward and after backward
  (same communication pattern, so it also pays for waiting on the slower peer),
* NaiveSyncBN / CGBN: speed-up over detectron2's NaiveSyncBatchNorm (target ~2).

Usage: ``python benchmarks/bench_cgbn.py --iters 200 --warmup 20`` (~75 s; the table in
docs/benchmarks.md)
"""

import argparse
import datetime
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

SHAPES = [
    (2, 64, 160, 160),
    (2, 256, 80, 80),
    (2, 512, 40, 40),
    (2, 1024, 20, 20),
    (2, 2048, 10, 10),
]
WORLD_SIZE = 2


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time(fns, args, device):
    """Median seconds of each of ``fns`` (name -> callable).

    The callables run round-robin within each iteration, so load bursts on a shared machine hit
    all of them alike; ranks start each call together (barrier, untimed).
    """
    times = {name: [] for name in fns}
    for i in range(args.warmup + args.iters):
        for name, fn in fns.items():
            dist.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _fwd_bwd(layer, x, dy):
    def run():
        x.grad = None
        layer(x).backward(dy)

    return run


def _bn_inline_all_reduce(layer, x, dy, buf):
    """Plain BN with a bare all_reduce after forward and after backward: the communication
    pattern of any synchronised BN (incl. waiting for the slower peer) at BN's compute cost."""

    def run():
        x.grad = None
        out = layer(x)
        dist.all_reduce(buf)
        out.backward(dy)
        dist.all_reduce(buf)

    return run


def _layers(channels, device):
    from detectron2.layers import NaiveSyncBatchNorm

    from megdet_d2.layers.cgbn import CGBN

    layers = {"BN": nn.BatchNorm2d(channels), "NaiveSyncBN": NaiveSyncBatchNorm(channels)}
    if device.type == "cuda":
        layers["SyncBN"] = nn.SyncBatchNorm(channels)
    layers["CGBN"] = CGBN(channels)
    return {k: v.to(device).train() for k, v in layers.items()}


def _worker(rank, port, args):
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=600),
    )
    from detectron2.utils import comm

    from megdet_d2.layers.groups import create_cgbn_groups

    comm.create_local_process_group(WORLD_SIZE)
    create_cgbn_groups(-1)
    rows = []
    for shape in SHAPES:
        torch.manual_seed(rank)
        x = torch.randn(*shape, device=device).requires_grad_()
        dy = torch.randn(*shape, device=device)
        floor = torch.zeros(2 * shape[1], device=device)
        layers = _layers(shape[1], device)
        fns = {"all_reduce": lambda: dist.all_reduce(floor)}
        fns["BN+2AR"] = _bn_inline_all_reduce(layers["BN"], x, dy, floor)
        for name, layer in layers.items():
            fns[name] = _fwd_bwd(layer, x, dy)
        rows.append({"shape": "x".join(map(str, shape)), **_time(fns, args, device)})
    gathered = [None] * WORLD_SIZE
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        # Slowest rank's median per cell: a synchronised layer is as slow as its slowest peer.
        table = [
            {k: (max(r[i][k] for r in gathered) if k != "shape" else v) for k, v in row.items()}
            for i, row in enumerate(rows)
        ]
        _print_table(table, args, device)
    dist.barrier()  # nobody tears down gloo while a peer still uses it
    dist.destroy_process_group()


def _print_table(table, args, device):
    sync = ["SyncBN"] if device.type == "cuda" else []
    cols = ["BN", "all_reduce", "BN+2AR", "NaiveSyncBN"] + sync + ["CGBN"]
    print(
        f"\n{WORLD_SIZE} processes, {device.type}, "
        f"{'1 thread each, gloo' if device.type == 'cpu' else 'NCCL'}; "
        f"median of {args.iters} iterations after {args.warmup} warm-up; fwd+bwd ms per layer\n"
    )
    header = ["shape (N,C,H,W)"] + [f"{c} ms" for c in cols]
    header += ["CGBN / BN", "CGBN / (BN + 2 all_reduce)", "CGBN / BN+2AR", "NaiveSyncBN / CGBN"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for row in table:
        cells = [row["shape"]] + [f"{row[c] * 1e3:.2f}" for c in cols]
        cells.append(f"{row['CGBN'] / row['BN']:.2f}")
        cells.append(f"{row['CGBN'] / (row['BN'] + 2 * row['all_reduce']):.2f}")
        cells.append(f"{row['CGBN'] / row['BN+2AR']:.2f}")
        cells.append(f"{row['NaiveSyncBN'] / row['CGBN']:.2f}")
        print("| " + " | ".join(cells) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=200, help="timed iterations per cell")
    parser.add_argument("--warmup", type=int, default=20, help="untimed iterations per cell")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < WORLD_SIZE:
        print(
            f"--device cuda needs {WORLD_SIZE} GPUs for NCCL (found {torch.cuda.device_count()}); "
            "SyncBatchNorm / NCCL comparison unsupported here"
        )
        return
    mp.start_processes(
        _worker, args=(_free_port(), args), nprocs=WORLD_SIZE, start_method="spawn", join=True
    )


if __name__ == "__main__":
    main()

"""One CGBN case on one process, against ``nn.BatchNorm2d`` on the group's concatenated batch.

``run_case`` is called in every process of a real process group (``tests/utils/dist.py``); the
same function drives every implementation, so the CPU emulation of the CUDA path in CI and the
real CUDA kernels on a GPU (``scripts/gpu_check.sh``) check the same things:

* ``path="cpu"``: CGBN's CPU half;
* ``"emulated"`` / ``"emulated_nccl"``: CGBN's CUDA half on the CPU stand-ins of torch's CUDA
  kernels (``tests/utils/cuda_kernels.py``), with gloo's or NCCL's gather branch;
* ``"cuda"``: CGBN on CUDA tensors (real kernels; gloo with CUDA tensors, or NCCL);
* ``"syncbn"``: torch's own ``nn.SyncBatchNorm`` autograd Function, on whatever kernels this
  process has (the stand-ins after ``patch_torch_kernels()``, or real ones on a GPU).

With ``direct=True`` the synchronised Function is called even on a group of one process (CGBN
short-cuts such a group to plain BN).

Each process gets its slice ``ns[i]`` of a deterministic batch; the result holds the maximum
errors against the reference (outputs and input gradients of this slice; weight / bias
gradients summed over the group, relative to their largest value; running statistics and
``num_batches_tracked``), the output's dtype and memory format, the collectives per call
(forward, backward) on the group, and the host synchronisations per call (emulated and CUDA
paths).
"""

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules._functions import SyncBatchNorm as SyncBatchNormFunction

from megdet_d2.layers import cgbn_cuda
from megdet_d2.layers.cgbn import CGBN
from megdet_d2.layers.cgbn_function import CGBNFunction
from megdet_d2.layers.groups import get_cgbn_group
from megdet_d2.modeling.statistics_tape import StatisticsTape

from .cuda_kernels import EMULATED, EMULATED_NCCL, HostSyncCounter, count_cuda_syncs

__all__ = ["merge_with_empty_rows", "run_case", "tolerance"]


def tolerance(dtype, module_dtype=None):
    """Max abs error allowed against the fp64 reference for outputs / grads of ``dtype``."""
    low = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
    return max(low.get(dtype, 0.0), low.get(module_dtype, 0.0)) or (
        1e-6 if dtype == torch.float64 and module_dtype in (None, torch.float64) else 1e-4
    )


def _data(ns, seed, c, hw, mean, std):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, c, *hw, generator=g, dtype=torch.float64) * std + mean for n in ns]
    gs = [torch.randn(n, c, *hw, generator=g, dtype=torch.float64) for n in ns]
    return xs, gs


def _reference(c, momentum, affine, track, seed):
    ref = nn.BatchNorm2d(c, momentum=momentum, affine=affine, track_running_stats=track).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if track:
            ref.running_mean.uniform_(-1, 1, generator=g)
            ref.running_var.uniform_(0.5, 2, generator=g)
        if affine:
            ref.weight.uniform_(0.5, 1.5, generator=g)
            ref.bias.uniform_(-1, 1, generator=g)
    return ref


def _syncbn_call(module, x, group):
    """``nn.SyncBatchNorm.forward``'s training branch, minus its device check."""
    factor = 0.0 if module.momentum is None else module.momentum
    if module.track_running_stats:
        module.num_batches_tracked.add_(1)
        if module.momentum is None:
            factor = 1.0 / float(module.num_batches_tracked)
    rm = module.running_mean if module.track_running_stats else None
    rv = module.running_var if module.track_running_stats else None
    return SyncBatchNormFunction.apply(
        x, module.weight, module.bias, rm, rv, module.eps, factor, group,
        dist.get_world_size(group),
    )  # fmt: skip


def _cgbn_direct(module, x, group):
    """CGBN's synchronised Function, also on a group of one process."""
    track = module.track_running_stats
    return CGBNFunction.apply(
        x, module.weight, module.bias, module.running_mean if track else None,
        module.running_var if track else None, module.num_batches_tracked if track else None,
        module.eps, module.momentum, group,
    )  # fmt: skip


def _max_err(a, b):
    if (a is None and b is not None and b.numel() == 0) or (b is None and a.numel() == 0):
        return 0.0  # no gradient for an empty slice (nn.SyncBatchNorm) is no error
    if a is None or b is None:
        return None if a is None and b is None else float("inf")
    return (a.double().cpu() - b.double().cpu()).abs().max().item() if a.numel() else 0.0


def _seq(group):
    return group._get_sequence_number_for_group()


def run_case(rank, ranks, ns, seed=0, path="cpu", device="cpu", group=None, direct=False,
             steps=1, momentum=0.1, affine=True, track=True, dtype=torch.float64,
             module_dtype=None, channels_last=False, mean=0.0, std=1.0, c=3, hw=(5, 4),
             autocast=None, x_grad=True, frozen_affine=False, replay=False,
             strided=False):  # fmt: skip
    """Run one case on this process (see the module docstring); returns a picklable dict.

    ``ranks``: the global ranks of this process's group, in order; ``ns[i]``: batch size of
    ``ranks[i]``. ``dtype``: the input's dtype; ``module_dtype``: the layer's (default fp32, or
    fp64 for fp64 input); ``autocast``: a dtype to run the forward under autocast with;
    ``strided``: an input with other strides (made contiguous by CGBN before either half).
    """
    group = group if group is not None else (get_cgbn_group() or dist.group.WORLD)
    module_dtype = module_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    me = ranks.index(rank)
    start, stop = sum(ns[:me]), sum(ns[: me + 1])
    ref = _reference(c, momentum, affine, track, seed)
    if path == "syncbn":
        layer = nn.SyncBatchNorm(c, momentum=momentum, affine=affine, track_running_stats=track)
        call = _syncbn_call
    else:
        layer = CGBN(c, momentum=momentum, affine=affine, track_running_stats=track)
        call = _cgbn_direct if direct else (lambda m, x, g: m(x))
        layer.process_group = group
    layer = layer.to(device=device, dtype=module_dtype)
    layer.load_state_dict(ref.state_dict())
    # the reference starts from the layer's values (rounded to its dtype)
    ref.load_state_dict({k: v.cpu().double() if v.is_floating_point() else v.cpu()
                         for k, v in layer.state_dict().items()})  # fmt: skip
    if frozen_affine and affine:
        layer.weight.requires_grad_(False)
        layer.bias.requires_grad_(False)
    kernels = {"emulated": EMULATED, "emulated_nccl": EMULATED_NCCL}.get(path)
    if device != "cpu":
        counter = count_cuda_syncs
    else:  # CGBN's CPU half never runs on a GPU: nothing to count
        counter = HostSyncCounter if kernels or path == "syncbn" else None

    res = {"out": 0.0, "gx": 0.0, "collectives": [], "syncs": []}
    for step in range(steps):
        xs, gs = _data(ns, seed + step, c, hw, mean, std)
        xref = torch.cat(xs).to(dtype).double().requires_grad_()  # the values CGBN sees
        out_ref = ref(xref)
        (out_ref * torch.cat(gs)).sum().backward()

        x = xs[me].to(device=device, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if strided:  # neither NCHW- nor channels_last-contiguous: every other column of a copy
            x = torch.stack([x, x], dim=-1).flatten(-2)[..., ::2].detach()
        x.requires_grad_(x_grad)
        gy = gs[me].to(device)
        amp = (
            torch.autocast(torch.device(device).type, dtype=autocast)
            if autocast
            else contextlib.nullcontext()
        )
        tape = StatisticsTape()
        with cgbn_cuda.use_kernels(kernels) if kernels else contextlib.nullcontext():
            before = _seq(group)
            syncs = counter() if counter else contextlib.nullcontext()
            with syncs as fwd_syncs, amp, tape.record() if replay else contextlib.nullcontext():
                out = call(layer, x, group)
            middle = _seq(group)
            if replay:  # a checkpointed block's rerun: no collective, the same statistics
                saved = [b.clone() for b in layer.buffers()]
                with tape.replay(), torch.no_grad():
                    res["replay_equal"] = bool(torch.equal(call(layer, x, group), out))
                    for b, value in zip(layer.buffers(), saved):  # as sub-linear memory does
                        b.copy_(value)
                res["replay_collectives"] = _seq(group) - middle
                middle = _seq(group)
            syncs = counter() if counter else contextlib.nullcontext()
            with syncs as bwd_syncs:
                (out.double() * gy).sum().backward()
            if device != "cpu":
                torch.cuda.synchronize()
            after = _seq(group)
        res["collectives"].append((middle - before, after - middle))
        res["syncs"].append((fwd_syncs.count, bwd_syncs.count) if counter else None)
        res["out"] = max(res["out"], _max_err(out, out_ref[start:stop].detach()))
        if x_grad:
            res["gx"] = max(res["gx"], _max_err(x.grad, xref.grad[start:stop]))
        res["out_dtype"] = str(out.dtype).replace("torch.", "")
        res["channels_last"] = bool(
            not out.is_contiguous() and out.is_contiguous(memory_format=torch.channels_last)
        )
        res["finite"] = bool(torch.isfinite(out).all())
        res["out_tensor"] = out.detach().double().cpu()
        res["gx_tensor"] = None if x.grad is None else x.grad.double().cpu()
    if affine:
        for name in ("weight", "bias"):
            param = getattr(layer, name)
            res[f"g{name[0]}_is_none"] = param.grad is None
            if param.requires_grad:  # every process joins (nn.SyncBatchNorm gives None if empty)
                grad = param.grad.clone() if param.grad is not None else torch.zeros_like(param)
                res[f"g{name[0]}_dtype"] = str(grad.dtype).replace("torch.", "")
                dist.all_reduce(grad, group=group)  # CGBN returns local sums, as DDP expects
                expected = getattr(ref, name).grad  # a sum over the batch: relative error
                scale = max(1.0, expected.abs().max().item())
                res["g" + name[0]] = _max_err(grad, expected) / scale
    if track:
        res["rm"] = _max_err(layer.running_mean, ref.running_mean)
        res["rv"] = _max_err(layer.running_var, ref.running_var)
        res["nbt"] = (int(layer.num_batches_tracked), int(ref.num_batches_tracked))
    return res


def merge_with_empty_rows(gather, dtype, device="cpu"):
    """Two processes' rows merged by ``gather`` (``batch_norm_gather_stats_with_counts``) alone,
    between the rows of empty processes as CGBN's CUDA half sends them, and after one empty row
    with count 0: the stacked ``[mean, invstd, running_mean, running_var]`` of each."""
    g = torch.Generator().manual_seed(3)
    c = 4
    means = torch.randn(2, c, generator=g).mul(5).to(dtype)
    invstds = torch.rand(2, c, generator=g).add(0.5).to(dtype)
    counts = torch.tensor([6.0, 20.0], dtype=dtype)
    e_mean, e_invstd = torch.zeros(1, c, dtype=dtype), torch.ones(1, c, dtype=dtype)

    def merge(m, i, n):
        m, i, n = m.to(device), i.to(device), n.to(device)
        rm = torch.zeros(c, dtype=dtype, device=device)
        rv = torch.ones(c, dtype=dtype, device=device)
        mean, invstd = gather(m, m, i, rm, rv, 0.1, 1e-5, n)
        return torch.stack([mean, invstd, rm, rv]).cpu()

    def interleave(empty_count):  # [empty, A, empty, B]
        e_count = torch.full((1,), empty_count, dtype=dtype)
        return merge(
            torch.cat([e_mean, means[:1], e_mean, means[1:]]),
            torch.cat([e_invstd, invstds[:1], e_invstd, invstds[1:]]),
            torch.cat([e_count, counts[:1], e_count, counts[1:]]),
        )

    return {
        "alone": merge(means, invstds, counts),
        "cgbn_empty_rows": interleave(cgbn_cuda._empty_count(dtype)),
        "count_0_first": interleave(0.0),
    }

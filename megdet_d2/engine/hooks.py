"""Training hooks for the paper's statistics (Table 1: positive / negative sample ratio), for
diagnosing a run (the gradient norm of every iteration) and for choosing the mini-batch (the
gradient noise scale B_simple, measured inside DDP)."""

import logging
import math

import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

__all__ = [
    "GradNormHook",
    "LocalGradNorm",
    "NOISE_SCALE_KEYS",
    "NoiseScaleHook",
    "SampleStatsHook",
    "SAMPLE_STATS_KEYS",
    "noise_scale_comm_hook",
    "noise_scale_estimates",
    "noise_scale_summary",
]

# What detectron2's samplers put into the event storage every iteration, in each process, as a
# MEAN over that process's images (StandardROIHeads.label_and_sample_proposals,
# RPN.losses) -> the mini-batch SUM this hook writes ("sample_stats/..." in metrics.json).
SAMPLE_STATS_KEYS = {
    "roi_head/num_fg_samples": "sample_stats/roi_num_pos",
    "roi_head/num_bg_samples": "sample_stats/roi_num_neg",
    "rpn/num_pos_anchors": "sample_stats/rpn_num_pos",
    "rpn/num_neg_anchors": "sample_stats/rpn_num_neg",
}


class SampleStatsHook(HookBase):
    """Sum the samplers' positive / negative counts over the whole mini-batch (all processes).

    Every iteration each process turns its per-image means back into counts (x its images per
    iteration) and ONE ``all_reduce`` sums them; the sums go to the storage unsmoothed, with
    ``sample_stats/roi_pos_neg_ratio`` = positives / negatives of the ROI-head sampler (Table 1's
    ratio). Every process must run the hook (it is a collective); keys a model does not produce
    (e.g. no RPN) are skipped. Place it before the ``PeriodicWriter`` so values reach
    metrics.json in the same iteration.
    """

    def __init__(self, images_per_process):
        self._images = images_per_process

    def after_step(self):
        storage = self.trainer.storage
        latest = storage.latest()
        stats = torch.zeros(2, len(SAMPLE_STATS_KEYS), dtype=torch.float64)  # sums, presence
        for i, key in enumerate(SAMPLE_STATS_KEYS):
            value = latest.get(key)
            if value is not None and value[1] == storage.iter:  # put in this iteration
                stats[0, i], stats[1, i] = value[0] * self._images, 1
        if comm.get_world_size() > 1:
            device = "cuda" if dist.get_backend() == dist.Backend.NCCL else "cpu"
            stats = stats.to(device)
            dist.all_reduce(stats)  # the hook's one collective
            stats = stats.cpu()
        sums = {}
        for i, name in enumerate(SAMPLE_STATS_KEYS.values()):
            if stats[1, i] > 0:
                sums[name] = round(stats[0, i].item(), 6)  # means x images: integers up to fp
                storage.put_scalar(name, sums[name], smoothing_hint=False)
        neg = sums.get("sample_stats/roi_num_neg", 0)
        if neg > 0:
            ratio = sums["sample_stats/roi_num_pos"] / neg
            storage.put_scalar("sample_stats/roi_pos_neg_ratio", ratio, smoothing_hint=False)


class GradNormHook(HookBase):
    """Put the global L2 norm of the gradients (after DDP's all-reduce, before the optimizer
    step and weight decay) into the storage as ``grad_norm`` every iteration; no collective.
    With ``MEGDET.LOG_PERIOD 1`` metrics.json holds it per iteration next to ``lr`` and the
    losses (``MEGDET.LOG_GRAD_NORM``)."""

    def after_backward(self):
        grads = [p.grad for p in self.trainer.model.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([g.detach().norm() for g in grads]))
            self.trainer.storage.put_scalar("grad_norm", norm.item(), smoothing_hint=False)


# What NoiseScaleHook writes every log period (metrics.json, TensorBoard).
NOISE_SCALE_KEYS = ("noise_scale/b_simple", "noise_scale/S", "noise_scale/G2")


def noise_scale_estimates(g2_small, g2_big, b, B):
    """Unbiased estimates of |G|² and S = tr(Σ) (McCandlish et al. 2018, Appendix A) from the
    squared norms of a batch-``b`` gradient (``g2_small``, e.g. one process's) and of a batch-``B``
    gradient (``g2_big``, e.g. the all-reduced one), ``b < B``; floats or tensors.

    Returns:
        ``(G2, S)``: (B·|G_B|² − b·|G_b|²) / (B − b) and (|G_b|² − |G_B|²) / (1/b − 1/B).
    """
    return (B * g2_big - b * g2_small) / (B - b), (g2_small - g2_big) / (1 / b - 1 / B)


class LocalGradNorm:
    """State of :func:`noise_scale_comm_hook`: the process group it all-reduces over (None =
    the world) and the sum of this iteration's squared bucket norms, until :meth:`pop`."""

    def __init__(self, process_group=None):
        self.process_group = process_group
        self.squared = None  # a float64 tensor on the gradients' device, no host sync
        self.buckets = 0

    def pop(self):
        """This iteration's |local gradient|² (None if no bucket was reduced); resets."""
        squared, self.squared, self.buckets = self.squared, None, 0
        return squared


def noise_scale_comm_hook(state, bucket):
    """DDP communication hook: torch's default all-reduce (same buckets, same overlap, same
    result), after adding the squared norm of the bucket's local gradient (this process's
    images, not yet averaged) to ``state`` (a :class:`LocalGradNorm`)."""
    # float32 (a float64 copy of the gradients would cost more than the rest of the hook)
    squared = torch.linalg.vector_norm(bucket.buffer(), dtype=torch.float32).double().square()
    state.squared = squared if state.squared is None else state.squared + squared
    state.buckets += 1
    return default_hooks.allreduce_hook(state.process_group, bucket)


class NoiseScaleHook(HookBase):
    """The gradient noise scale B_simple = tr(Σ) / |G|² (McCandlish et al. 2018), measured with no
    extra backward pass: each process's gradient before DDP's all-reduce is a batch-``b``
    gradient, the all-reduced one a batch-``B`` gradient (``MEGDET.NOISE_SCALE``).

    Per iteration (no collective; on a GPU no host sync, except AMP's ``get_scale``; two
    float32 norms over the gradients): :func:`noise_scale_comm_hook` sums the
    local |G_b|² over the buckets; ``after_backward`` reads |G_B|² from the parameters' ``.grad``
    (before gradient clipping, which detectron2 does inside ``optimizer.step``; AMP's loss scale
    divided out) and updates exponential moving averages (constant ``ema``, bias-corrected; an
    iteration with a non-finite gradient, e.g. an AMP overflow, is left out) of both. Every log
    period ONE all-reduce averages the local EMA over the processes; as the estimators are linear,
    the EMAs of |G|² and S follow, and B_simple = EMA(S) / EMA(|G|²) (each averaged separately,
    as the paper advises) goes to the storage as ``noise_scale/{b_simple,S,G2}`` (B_simple is
    NaN, ``null`` in metrics.json, while the |G|² estimate is not positive). At the end one line
    compares the mini-batch with the last B_simple. With one process it logs that once and does
    nothing else. Every process must run it (a collective); place it before the writer.
    """

    def __init__(self, images_per_process, batch_size, ema=0.99, period=20):
        """``images_per_process`` = b, ``batch_size`` = B (``SOLVER.IMS_PER_BATCH``), ``ema`` the
        weight of the past in the moving averages, ``period`` the writer's (``LOG_PERIOD``)."""
        self._b, self._B, self._beta, self._period = images_per_process, batch_size, ema, period
        self._state, self._ema, self.latest = None, None, None

    def before_train(self):
        model = self.trainer.model
        if comm.get_world_size() < 2:
            logging.getLogger(__name__).info(
                "MEGDET.NOISE_SCALE: the gradient noise scale needs two or more processes (it "
                "compares each process's gradient with the all-reduced one); not measured here"
            )
            return
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise TypeError(
                f"NoiseScaleHook needs a DistributedDataParallel model, not {type(model).__name__}"
            )
        self._state = LocalGradNorm(model.process_group)
        model.register_comm_hook(self._state, noise_scale_comm_hook)

    def after_backward(self):
        if self._state is None:
            return
        local = self._state.pop()
        grads = [p.grad for p in self.trainer.model.parameters() if p.grad is not None]
        if local is None or not grads:
            return
        averaged = torch.nn.utils.get_total_norm(grads).double().square().to(local.device)
        scaler = getattr(getattr(self.trainer, "_trainer", self.trainer), "grad_scaler", None)
        values = torch.stack([local, averaged])
        if scaler is not None and scaler.is_enabled():  # AMP: the gradients of scale x loss
            values = values / scaler.get_scale() ** 2
        finite = torch.isfinite(values).all()
        sample = torch.cat([torch.where(finite, values, 0.0), finite.double().reshape(1)])
        if self._ema is None:
            self._ema = torch.zeros_like(sample)
        self._ema.mul_(self._beta).add_(sample, alpha=1 - self._beta)  # [local, averaged, weight]

    def after_step(self):
        it = self.trainer.iter
        if self._ema is None or not (
            (it + 1) % self._period == 0 or it + 1 == self.trainer.max_iter
        ):
            return
        device = "cuda" if dist.get_backend() == dist.Backend.NCCL else "cpu"
        ema = self._ema.to(device, copy=True)  # the all-reduce is in place: not on the state
        dist.all_reduce(ema)  # the hook's one collective, every log period
        local, averaged, weight = (ema.cpu() / comm.get_world_size()).tolist()
        if weight <= 0:  # only non-finite gradients so far
            return
        g2, s = noise_scale_estimates(local / weight, averaged / weight, self._b, self._B)
        b_simple = s / g2 if g2 > 0 else math.nan
        storage = self.trainer.storage
        for key, value in zip(NOISE_SCALE_KEYS, (b_simple, s, g2)):
            storage.put_scalar(key, value, smoothing_hint=False)
        self.latest = {"iteration": it, "b_simple": b_simple, "S": s, "G2": g2}

    def after_train(self):
        if self.latest is None:
            return
        b_simple, it = self.latest["b_simple"], self.latest["iteration"]
        logging.getLogger(__name__).info(noise_scale_summary(b_simple, self._B, it, self._beta))


def noise_scale_summary(b_simple, batch_size, iteration, ema):
    """The end-of-training line: B_simple and what it implies for this mini-batch."""
    window = f"EMA {ema} over ~{1 / (1 - ema):.0f} iterations" if ema > 0 else "no EMA"
    if not b_simple > 0:
        return (
            f"Gradient noise scale at iteration {iteration + 1}: not measurable yet (the |G|² "
            f"estimate is not positive: noise dominates, B_simple is probably well above the "
            f"mini-batch {batch_size}; {window}): average longer (MEGDET.NOISE_SCALE_EMA closer "
            "to 1, more iterations)"
        )
    ratio = batch_size / b_simple
    return (
        f"Gradient noise scale at iteration {iteration + 1} ({window}): B_simple = "
        f"{b_simple:.3g} images; mini-batch {batch_size} = {ratio:.3g} × B_simple: about "
        f"1 + B/B_simple = {1 + ratio:.3g}× the minimum epochs and 1 + B_simple/B = "
        f"{1 + 1 / ratio:.3g}× the minimum updates (McCandlish et al. 2018; docs/lr_policy.md)"
    )

"""Training hooks for the paper's statistics (Table 1: positive / negative sample ratio) and
for diagnosing a run (the gradient norm of every iteration)."""

import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["GradNormHook", "SampleStatsHook", "SAMPLE_STATS_KEYS"]

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

"""Cross-GPU batch normalisation (CGBN, MegDet §3.3, Algorithm 1): the module.

``CGBN`` is an ``nn.BatchNorm2d`` whose training-mode statistics are those of all samples in a
process group, as if one BatchNorm2d saw the group's concatenated batch. The synchronised
arithmetic -- one collective in forward, one in backward; a CPU (gloo) half and a CUDA (NCCL)
half -- is in ``cgbn_function.py``, ``cgbn_cpu.py`` and ``cgbn_cuda.py``, as torch keeps
``nn.SyncBatchNorm``'s in ``_functions.py``.
"""

import torch
import torch.distributed as dist
import torch.nn as nn

from .cgbn_function import CGBNFunction
from .groups import get_cgbn_group
from .norm_registry import NORM_REGISTRY

__all__ = ["CGBN"]


@NORM_REGISTRY.register()
class CGBN(nn.BatchNorm2d):
    """BatchNorm2d with statistics over all samples of a process group (MegDet's CGBN).

    A subclass of ``nn.BatchNorm2d`` so that optimizer parameter grouping, fvcore's PreciseBN
    and checkpoints treat it as BatchNorm. In eval mode, or when the group has one process (or
    ``torch.distributed`` is not initialised) it is exactly ``nn.BatchNorm2d``, with no
    communication.

    Args:
        process_group: group whose samples are normalised together; ``None`` (default) means
            the group configured at start-up, ``groups.get_cgbn_group()``, looked up per call.
        Other arguments are those of ``nn.BatchNorm2d``.
    """

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        process_group=None,
        device=None,
        dtype=None,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _group(self):
        """The process group to synchronise over, or None when there is nothing to sync."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else get_cgbn_group()
        if group is None or dist.get_world_size(group) <= 1:
            return None
        return group

    def forward(self, input):
        self._check_input_dim(input)
        group = self._group() if self.training else None
        if group is None:
            return super().forward(input)
        return CGBNFunction.apply(
            input,
            self.weight,
            self.bias,
            self.running_mean if self.track_running_stats else None,
            self.running_var if self.track_running_stats else None,
            self.num_batches_tracked if self.track_running_stats else None,
            self.eps,
            self.momentum,
            group,
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # detectron2's FrozenBatchNorm2d (version 3) has running stats but no
        # num_batches_tracked; default it to 0 as BatchNorm does for its own version < 2.
        key = prefix + "num_batches_tracked"
        if self.track_running_stats and key not in state_dict:
            if (prefix + "running_mean") in state_dict:
                state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self):
        return super().extra_repr() + (
            f", process_group={self.process_group}" if self.process_group is not None else ""
        )

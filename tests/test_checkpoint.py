"""``MegDetCheckpointer``: an interrupted save never leaves a checkpoint ``--resume`` would load
truncated, and a checkpoint whose shapes do not fit the model is an error naming the keys."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from megdet_d2 import ConfigError
from megdet_d2.engine import MegDetCheckpointer

# A child saving "model_final" twice through a real checkpointer; the second save blocks inside
# serialisation (after the checkpoint file would have been opened) until the parent kills it.
_SAVE_AND_HANG = """
import os, sys, time
import torch
from torch import nn
from detectron2.checkpoint import DetectionCheckpointer
from megdet_d2 import ConfigError
from megdet_d2.engine import MegDetCheckpointer

class Hang:
    def __reduce__(self):
        open(os.path.join(sys.argv[2], "saving"), "w").close()
        time.sleep(600)

class Extra:
    def __init__(self):
        self.value = None
    def state_dict(self):
        return {"value": self.value}
    def load_state_dict(self, state):
        self.value = state["value"]

cls = {"megdet": MegDetCheckpointer, "detectron2": DetectionCheckpointer}[sys.argv[1]]
extra = Extra()
ckpt = cls(nn.Linear(3, 4), sys.argv[2], save_to_disk=True, extra=extra)
extra.value = 9
ckpt.save("model_final", iteration=9)
extra.value = Hang()
ckpt.save("model_final", iteration=19)
"""


def _kill_during_second_save(tmp_path, which):
    proc = subprocess.Popen([sys.executable, "-c", _SAVE_AND_HANG, which, str(tmp_path)])
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "saving").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "child did not save"
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path):
    _kill_during_second_save(tmp_path, "megdet")
    model = nn.Linear(3, 4)
    ckpt = MegDetCheckpointer(model, str(tmp_path), save_to_disk=True)
    assert ckpt.get_checkpoint_file() == str(tmp_path / "model_final.pth")
    extra = ckpt.resume_or_load("", resume=True)
    assert extra["iteration"] == 9
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "last_checkpoint",
        "model_final.pth",
        "saving",
    ]


def test_temporary_file_of_the_killed_save_is_removed_at_the_next_start(tmp_path):
    _kill_during_second_save(tmp_path, "megdet")
    stale = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert stale and stale[0].startswith(".model_final.pth."), stale  # left by the kill
    alive = tmp_path / f".model_0000009.pth.{os.getppid()}.tmp"  # a live writer's: kept
    alive.write_bytes(b"in progress")
    MegDetCheckpointer(nn.Linear(3, 4), str(tmp_path), save_to_disk=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == [alive.name]


def test_detectron2s_checkpointer_would_have_truncated_it(tmp_path):
    """The same kill with detectron2's checkpointer: the file resume points at is unreadable."""
    _kill_during_second_save(tmp_path, "detectron2")
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    with pytest.raises(Exception):
        torch.load(tmp_path / "model_final.pth")


class _Fails:
    def state_dict(self):
        return {"x": _Unpicklable()}


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full")


def test_failed_save_leaves_no_partial_file(tmp_path):
    model = nn.Linear(3, 4)
    MegDetCheckpointer(model, str(tmp_path), save_to_disk=True).save("model_0000009", iteration=9)
    ckpt = MegDetCheckpointer(model, str(tmp_path), save_to_disk=True, extra=_Fails())
    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.save("model_0000019", iteration=19)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000009.pth"]
    assert ckpt.get_checkpoint_file() == str(tmp_path / "model_0000009.pth")


def test_shape_mismatch_is_an_error_naming_the_keys(tmp_path):
    path = str(tmp_path / "other.pth")
    torch.save({"model": nn.Linear(3, 4).state_dict()}, path)
    with pytest.raises(ValueError) as exc:
        MegDetCheckpointer(nn.Linear(3, 5)).load(path)
    message = str(exc.value)
    assert "weight (4, 3) in the checkpoint vs (5, 3) in the model" in message
    assert "bias (4,) in the checkpoint vs (5,) in the model" in message
    assert "MEGDET.STRICT_SHAPES" in message and "\n" not in message


def test_shape_mismatch_can_be_allowed_for_fine_tuning(tmp_path):
    path = str(tmp_path / "other.pth")
    src = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    torch.save({"model": src.state_dict()}, path)
    dst = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 7))  # another number of classes
    MegDetCheckpointer(dst, strict_shapes=False).load(path)
    torch.testing.assert_close(dst[0].weight, src[0].weight)  # what fits is loaded


def test_checkpoint_of_another_model_is_an_error_unless_partial_loading_is_allowed(tmp_path):
    """Names that match nothing (a torchvision-style file): detectron2 would train from scratch."""
    path = str(tmp_path / "other.pth")
    torch.save({"model": {"conv1.weight": torch.zeros(4, 3), "fc.bias": torch.zeros(4)}}, path)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4))
    with pytest.raises(ConfigError) as exc:
        MegDetCheckpointer(model).load(path)
    message = str(exc.value)
    assert message.startswith("the checkpoint provides 0 of the model's 4 learned tensors; it ")
    assert "'conv1.weight'" in message and "'0.weight'" in message and "\n" not in message
    assert "MEGDET.ALLOW_PARTIAL_WEIGHTS True" in message
    MegDetCheckpointer(model, allow_partial=True).load(path)  # fine-tuning on purpose


def test_checkpoint_with_half_of_the_model_loads(tmp_path):
    path = str(tmp_path / "backbone.pth")
    src = nn.Sequential(nn.Linear(3, 4))
    torch.save({"model": src.state_dict()}, path)  # "0.weight", "0.bias": 2 of 4 tensors
    dst = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    MegDetCheckpointer(dst).load(path)
    torch.testing.assert_close(dst[0].weight, src[0].weight)


def test_imagenet_style_checkpoint_without_bn_statistics_loads(tmp_path):
    """MSRA's R-50.pkl holds conv weights and BN scale / bias, no running statistics: they do
    not count, or its backbone would be under half of an R50-FPN Faster R-CNN's tensors."""
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4),
                             nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4))  # fmt: skip
    learned = {k: v for k, v in backbone.state_dict().items() if "running" not in k}
    learned.pop("1.num_batches_tracked"), learned.pop("3.num_batches_tracked")
    path = str(tmp_path / "imagenet.pth")
    torch.save({"model": learned}, path)  # 6 tensors
    detector = nn.Sequential(*backbone, nn.Flatten(), nn.Linear(4, 4), nn.Linear(4, 2))
    MegDetCheckpointer(detector).load(path)  # 6 of 10 learned tensors (6 of 14 with statistics)
    torch.testing.assert_close(detector[0].weight, backbone[0].weight)

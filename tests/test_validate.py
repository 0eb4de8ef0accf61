"""Start-up validation: every bad input ends with ONE line naming the key, value and fix, fast.

Most cases go through ``train_net.load_config`` in-process (the exact code the launcher runs
before spawning, inside ``exit_on_config_error``); two run ``train_net.py`` for real to prove the
exit path (status 2, one line on stderr, no traceback, no worker spawned).
"""

import contextlib
import json
import os
import subprocess
import sys
import time

import psutil
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import default_argument_parser

import train_net
from megdet_d2.engine import exit_on_config_error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "quickstart", "shapes_R18_FPN.yaml")
FAST_S = 10  # a check reads no data and builds no model: seconds even on a loaded machine


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("validate") / "data")


def config_error(capsys, data_root, *opts, num_gpus=2, flags=()):
    """Run the launcher's config step; return its one stderr line (asserting exit status 2)."""
    args = default_argument_parser().parse_args(
        ["--num-gpus", str(num_gpus), "--config-file", CONFIG, *flags, "DATASETS.QUICKSTART.ROOT",
         data_root, "DATASETS.QUICKSTART.NUM_TRAIN", "8", "DATASETS.QUICKSTART.NUM_VAL", "4",
         *opts]
    )  # fmt: skip
    capsys.readouterr()
    start = time.monotonic()
    with pytest.raises(SystemExit) as exc:
        with exit_on_config_error():
            train_net.load_config(args)
    elapsed = time.monotonic() - start
    assert exc.value.code == 2
    assert elapsed < FAST_S, elapsed
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("Config error: ")
    return lines[0][len("Config error: ") :]


def test_valid_config_passes(data_root):
    args = default_argument_parser().parse_args(
        ["--num-gpus", "2", "--config-file", CONFIG, "DATASETS.QUICKSTART.ROOT", data_root,
         "DATASETS.QUICKSTART.NUM_TRAIN", "8", "DATASETS.QUICKSTART.NUM_VAL", "4"]
    )  # fmt: skip
    cfg = train_net.load_config(args)
    assert cfg.MODEL.RESNETS.NORM == "CGBN" and cfg.is_frozen()


@pytest.mark.parametrize(
    "opts, num_gpus, expected",
    [
        (["MODEL.CGBN.GROUP_SIZE", "3"], 2, "MODEL.CGBN.GROUP_SIZE=3 must divide the world size 2"),
        (["MODEL.CGBN.GROUP_SIZE", "-2"], 2, "MODEL.CGBN.GROUP_SIZE=-2 must be a positive divisor"),
        (["SOLVER.IMS_PER_BATCH", "6"], 4, "SOLVER.IMS_PER_BATCH=6 must be a positive multiple"),
        (["MODEL.ROI_BOX_HEAD.NORM", "CGNB"], 2, "MODEL.ROI_BOX_HEAD.NORM='CGNB' is not a known"),
        (["MODEL.FPN.NORM", "batchnorm"], 2, "MODEL.FPN.NORM='batchnorm' is not a known norm"),
        (["SOLVER.MEGDET.SCHEDULE", "short"], 2, "SOLVER.MEGDET.SCHEDULE='short' is not a regis"),
        (["SOLVER.LR_SCHEDULER_NAME", "Cosine"], 2, "SOLVER.LR_SCHEDULER_NAME='Cosine' is not a"),
        (["SOLVER.WARMUP_ITERS", "200"], 2, "SOLVER.WARMUP_ITERS=200 must be smaller than SOLVER"),
        (["SOLVER.BASE_LR", "0.0"], 2, "SOLVER.BASE_LR=0.0 must be positive"),
        (["SOLVER.BASE_LR", "-0.1"], 2, "SOLVER.BASE_LR=-0.1 must be positive"),
        (["SOLVER.REFERENCE_WORLD_SIZE", "8"], 2, "SOLVER.REFERENCE_WORLD_SIZE=8 cannot be combin"),
        (["SOLVER.MEGDET.SCHEDULE", "normal", "SOLVER.MEGDET.EPOCH_SIZE", "2"], 2,
         "SOLVER.MEGDET.EPOCH_SIZE=2 is smaller than SOLVER.IMS_PER_BATCH=4"),
        (["DATASETS.TRAIN", "('megdet_shapes_trian',)"], 2,
         "DATASETS.TRAIN names 'megdet_shapes_trian', which is not a registered dataset (did you "
         "mean ['megdet_shapes_train'"),
        (["DATASETS.TEST", "('no_such_set',)"], 2, "DATASETS.TEST names 'no_such_set', which is"),
        (["MODEL.WEIGHTS", "/no/such/model.pth"], 2, "MODEL.WEIGHTS='/no/such/model.pth' is not a"),
        (["MODEL.ROI_HEADS.NUM_CLASSES", "80"], 2, "MODEL.ROI_HEADS.NUM_CLASSES=80 but dataset "
         "'megdet_shapes_train' has 3 classes; set MODEL.ROI_HEADS.NUM_CLASSES 3"),
        (["MODEL.META_ARCHITECTURE", "RetinaNet", "MODEL.RETINANET.NUM_CLASSES", "2"], 2,
         "MODEL.RETINANET.NUM_CLASSES=2 but dataset 'megdet_shapes_train' has 3 classes; set"),
    ],
)  # fmt: skip
def test_bad_value_is_one_line_naming_key_value_and_fix(
    capsys, data_root, opts, num_gpus, expected
):
    message = config_error(capsys, data_root, *opts, num_gpus=num_gpus)
    assert message.startswith(expected), message
    assert ";" in message or "(or" in message, f"no fix given: {message}"


def test_unknown_norm_lists_the_registered_names(capsys, data_root):
    message = config_error(capsys, data_root, "MODEL.RESNETS.NORM", "CGBM")
    assert "'CGBN'" in message and "'FrozenBN'" in message and "'GN'" in message


def test_builtin_coco_names_without_files_show_the_missing_path(capsys, data_root):
    """detectron2 registers coco_2017_* at import whether or not the files exist."""
    json_file = MetadataCatalog.get("coco_2017_val").json_file
    assert not os.path.exists(json_file)  # precondition: no COCO under ./datasets here
    message = config_error(capsys, data_root, "DATASETS.TEST", "('coco_2017_val',)")
    assert message.startswith("DATASETS.TEST names 'coco_2017_val', whose json_file"), message
    assert repr(json_file) in message and "DETECTRON2_DATASETS" in message


def test_missing_image_folder_is_named(capsys, data_root, tmp_path):
    json_file = tmp_path / "ann.json"
    json_file.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    name = "megdet_test_missing_images"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(json_file), str(tmp_path / "no_images"))
    message = config_error(
        capsys, data_root, "DATASETS.TEST", f"('{name}',)", flags=["--eval-only"]
    )
    assert f"whose image_root '{tmp_path / 'no_images'}' does not exist" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_device_without_gpu(capsys, data_root):
    message = config_error(capsys, data_root, "MODEL.DEVICE", "cuda")
    assert message.startswith("MODEL.DEVICE='cuda' but no CUDA GPU is visible; set MODEL.DEVICE")


def test_more_processes_than_gpus(capsys, data_root, monkeypatch):
    """Counted per machine; the GPU count is faked (this check only reads it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    message = config_error(capsys, data_root, "MODEL.DEVICE", "cuda", num_gpus=4)
    assert message.startswith("--num-gpus=4 processes per machine but only 2 GPU(s) are visible")


def test_weights_are_not_checked_when_resume_finds_a_checkpoint(data_root, tmp_path):
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    torch.save({"model": {}}, tmp_path / "model_0000009.pth")
    args = default_argument_parser().parse_args(
        ["--num-gpus", "2", "--resume", "--config-file", CONFIG, "DATASETS.QUICKSTART.ROOT",
         data_root, "OUTPUT_DIR", str(tmp_path), "MODEL.WEIGHTS", "/no/such/model.pth"]
    )  # fmt: skip
    train_net.load_config(args)  # MODEL.WEIGHTS is unused: no error


def test_torchrun_layout_is_validated(capsys, data_root, monkeypatch):
    """Under torchrun the layout comes from the environment, not --num-gpus."""
    env = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    message = config_error(capsys, data_root, "SOLVER.IMS_PER_BATCH", "6", num_gpus=1)
    assert message.startswith("SOLVER.IMS_PER_BATCH=6 must be a positive multiple of the number "
                              "of processes (4)")  # fmt: skip


def _train_net_fails_fast(tmp_path, *opts):
    """Real train_net.py: exit 2, one line, no traceback, no worker spawned, within seconds."""
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--num-gpus", "2",
           "--config-file", CONFIG, "DATASETS.QUICKSTART.ROOT", str(tmp_path / "data"),
           "DATASETS.QUICKSTART.NUM_TRAIN", "8", "DATASETS.QUICKSTART.NUM_VAL", "4",
           "OUTPUT_DIR", str(tmp_path / "out"), *opts]  # fmt: skip
    start = time.monotonic()
    proc = psutil.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Workers are multiprocessing "spawn" children (`python -c "from multiprocessing.spawn
    # import spawn_main ..."`); other short-lived children, e.g. the `ldconfig -p` that
    # ctypes.util.find_library runs while torch is imported, are not workers.
    workers = set()
    while proc.poll() is None and time.monotonic() - start < 120:
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "multiprocessing" in " ".join(child.cmdline()):
                    workers.add(child.pid)
        time.sleep(0.1)
    _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 2, stderr[-3000:]
    assert time.monotonic() - start < 60
    assert "Traceback" not in stderr
    assert not workers, "a worker was spawned"
    assert not (tmp_path / "out").exists()
    return stderr.strip().splitlines()[-1]


def test_train_net_exits_with_one_line_on_a_missing_weights_file(tmp_path):
    last = _train_net_fails_fast(tmp_path, "MODEL.WEIGHTS", str(tmp_path / "nope.pth"))
    assert last == (
        f"Config error: MODEL.WEIGHTS='{tmp_path / 'nope.pth'}' is not a file; give an existing "
        "checkpoint, a URL or detectron2:// path, or '' to start from scratch"
    )


def test_train_net_exits_with_one_line_on_a_checkpoint_that_does_not_fit(tmp_path):
    """Shapes are compared in the launcher (model built on the meta device), not in workers."""
    path = tmp_path / "other.pth"
    # 5 classes + background where the quickstart model has 3 + 1
    torch.save({"model": {"roi_heads.box_predictor.cls_score.weight": torch.zeros(6, 256)}}, path)
    last = _train_net_fails_fast(tmp_path, "MODEL.WEIGHTS", str(path))
    assert last.startswith(f"Config error: MODEL.WEIGHTS='{path}': checkpoint shapes do not fit")
    assert "roi_heads.box_predictor.cls_score.weight (6, 256) in the checkpoint vs (4, 256)" in last
    assert "MEGDET.STRICT_SHAPES False" in last


def test_checkpoint_shapes_can_be_allowed_for_fine_tuning(data_root, tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {"roi_heads.box_predictor.cls_score.weight": torch.zeros(6, 256)}}, path)
    args = default_argument_parser().parse_args(
        ["--num-gpus", "2", "--config-file", CONFIG, "DATASETS.QUICKSTART.ROOT", data_root,
         "MODEL.WEIGHTS", str(path), "MEGDET.STRICT_SHAPES", "False"]
    )  # fmt: skip
    train_net.load_config(args)  # detectron2's behaviour: a warning at load time, no error


def test_truncated_checkpoint_is_named(capsys, data_root, tmp_path):
    path = tmp_path / "model_final.pth"
    torch.save({"model": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:100])  # as if the copy was cut off
    message = config_error(capsys, data_root, "MODEL.WEIGHTS", str(path))
    assert message.startswith(f"MODEL.WEIGHTS='{path}' cannot be read as a checkpoint ("), message


def test_resume_from_a_last_checkpoint_naming_a_missing_file(capsys, data_root, tmp_path):
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    message = config_error(capsys, data_root, "OUTPUT_DIR", str(tmp_path), flags=["--resume"])
    assert message.startswith(
        f"OUTPUT_DIR/last_checkpoint ({tmp_path / 'last_checkpoint'}) names 'model_0000009.pth', "
        "which does not exist in OUTPUT_DIR"
    ), message

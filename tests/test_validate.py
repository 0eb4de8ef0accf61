"""Start-up validation: every bad input ends with ONE line naming the key or file and the fix.

Most cases go through ``train_net.load_config`` in-process (the exact code the launcher runs
before spawning, inside ``exit_on_config_error``); a few run ``train_net.py`` (and torchrun) for
real to prove the exit paths: status 2, one ``Config error:`` line on stderr, no traceback, no
worker spawned for launcher faults, and the whole job ended for a fault one worker finds.
"""

import contextlib
import json
import os
import shutil
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
from megdet_d2 import ConfigError
from megdet_d2.engine.validate import exit_on_config_error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "quickstart", "shapes_R18_FPN.yaml")
FAST_S = 10  # a check reads no data and builds no model: seconds even on a loaded machine


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("validate") / "data")


def config_error(capsys, data_root, *opts, num_gpus=2, flags=(), config=CONFIG):
    """Run the launcher's config step; return its one stderr line (asserting exit status 2)."""
    config_flag = ["--config-file", config] if config else []
    args = default_argument_parser().parse_args(
        ["--num-gpus", str(num_gpus), *config_flag, *flags, "MEGDET.QUICKSTART.ROOT",
         data_root, "MEGDET.QUICKSTART.NUM_TRAIN", "8", "MEGDET.QUICKSTART.NUM_VAL", "4",
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
        ["--num-gpus", "2", "--config-file", CONFIG, "MEGDET.QUICKSTART.ROOT", data_root,
         "MEGDET.QUICKSTART.NUM_TRAIN", "8", "MEGDET.QUICKSTART.NUM_VAL", "4"]
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
        # issue #12: each of these was a traceback (or a ZeroDivisionError) from every worker
        ([], 0, "--num-gpus=0 must be at least 1"),
        (["SOLVER.MAX_ITER"], 2, "SOLVER.MAX_ITER on the command line has no value; overrides"),
        (["MEGDET.LOG_PERIOD", "1", "SOLVER.STEPS"], 2,
         "SOLVER.STEPS on the command line has no value"),
        (["MODEL.ROI_HEADS.NUM_CLASES", "3"], 2, "MODEL.ROI_HEADS.NUM_CLASES on the command line "
         "is not a config key (did you mean ['MODEL.ROI_HEADS.NUM_CLASSES'"),
        (["SOLVER.MAX_ITER", "abc"], 2, "SOLVER.MAX_ITER=abc on the command line is of type str "
         "where int is expected"),
        (["MEGDET.LOG_PERIOD", "0"], 2,
         "MEGDET.LOG_PERIOD=0 must be positive (iterations between metric "),
        (["SOLVER.CHECKPOINT_PERIOD", "0"], 2, "SOLVER.CHECKPOINT_PERIOD=0 must be positive"),
        (["SOLVER.WARMUP_ITERS", "-5"], 2, "SOLVER.WARMUP_ITERS=-5 must be non-negative"),
        (["MEGDET.DIST_TIMEOUT_S", "0"], 2, "MEGDET.DIST_TIMEOUT_S=0 must be positive (seconds"),
        (["SOLVER.LR_SCHEDULER_NAME", "WarmupMultiStepLR", "SOLVER.STEPS", "()",
          "SOLVER.MAX_ITER", "-5"], 2, "SOLVER.MAX_ITER=-5 must be positive"),
        (["TEST.DETECTIONS_PER_IMAGE", "0"], 2, "TEST.DETECTIONS_PER_IMAGE=0 must be positive"),
        (["DATALOADER.NUM_WORKERS", "-1"], 2, "DATALOADER.NUM_WORKERS=-1 must be non-negative"),
        (["INPUT.MIN_SIZE_TRAIN", "(0,)"], 2, "INPUT.MIN_SIZE_TRAIN=(0,) must hold positive"),
        (["MODEL.DEVICE", "cpux"], 2, "MODEL.DEVICE='cpux' is not a device; use 'cpu' or 'cuda'"),
        (["MEGDET.QUICKSTART.ROOT", "/sys/megdet_data"], 2, "MEGDET.QUICKSTART.ROOT="
         "'/sys/megdet_data': the quickstart data cannot be written there ("),
        (["MEGDET.QUICKSTART.NUM_TRAIN", "0"], 2, "MEGDET.QUICKSTART.NUM_TRAIN=0 must be at"),
        (["MODEL.ROI_HEADS.NAME", "StandardROIHead"], 2, "MODEL.ROI_HEADS.NAME='StandardROIHead' "
         "is not registered (did you mean ['StandardROIHeads'"),
        (["DATALOADER.SAMPLER_TRAIN", "Random"], 2, "DATALOADER.SAMPLER_TRAIN='Random' is not"),
        (["SOLVER.MEGDET.SCHEDULE", "normal", "SOLVER.MAX_ITER", "10"], 2,
         "SOLVER.MAX_ITER=10 is set on the command line, but SOLVER.MEGDET.SCHEDULE='normal' "
         "derives SOLVER.MAX_ITER=22 "),
        (["SOLVER.MEGDET.SCHEDULE", "normal", "TEST.EVAL_PERIOD", "5"], 2,
         "TEST.EVAL_PERIOD=5 is set on the command line, but SOLVER.MEGDET.SCHEDULE='normal' "
         "derives TEST.EVAL_PERIOD=2 "),
        # issue #20: a list-valued key that does not fit the model (before: an assertion or a
        # KeyError from every worker, or a value silently ignored)
        (["MODEL.PIXEL_MEAN", "[103.5, 116.3]"], 2, "MODEL.PIXEL_MEAN=[103.5, 116.3] has 2 "
         "value(s) but INPUT.FORMAT='BGR' images have 3 channel(s); give 3 value(s), one per "
         "channel"),
        (["MODEL.PIXEL_STD", "[57.4, 57.1]"], 2, "MODEL.PIXEL_STD=[57.4, 57.1] has 2 value(s) "
         "but INPUT.FORMAT='BGR' images have 3"),
        (["INPUT.FORMAT", "L"], 2, "MODEL.PIXEL_MEAN=[103.53, 116.28, 123.675] has 3 value(s) "
         "but INPUT.FORMAT='L' images have 1 channel(s)"),
        (["MODEL.PIXEL_STD", "[1.0, 0.0, 1.0]"], 2, "MODEL.PIXEL_STD=[1.0, 0.0, 1.0] must be "
         "positive (images are divided by it)"),
        (["MODEL.ANCHOR_GENERATOR.SIZES", "[[16], [32], [64]]"], 2,
         "MODEL.ANCHOR_GENERATOR.SIZES=[[16], [32], [64]] gives 3 levels but "
         "MODEL.RPN.IN_FEATURES has 5 feature map(s); give 5 lists (one per level), or one"),
        (["MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", "[[1.0], [1.0]]"], 2,
         "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS=[[1.0], [1.0]] gives 2 levels but "
         "MODEL.RPN.IN_FEATURES has 5"),
        (["MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", "[[1.0], [1.0], [0.5, 2.0], [1.0], [1.0]]"], 2,
         "MODEL.ANCHOR_GENERATOR.SIZES=[[16], [32], [64], [128], [256]] with ASPECT_RATIOS="
         "[[1.0], [1.0], [0.5, 2.0], [1.0], [1.0]] gives [1, 1, 2, 1, 1] anchors per location"),
        (["MODEL.ANCHOR_GENERATOR.SIZES", "[]"], 2,
         "MODEL.ANCHOR_GENERATOR.SIZES=[] must be a non-empty list"),
        (["MODEL.RPN.IN_FEATURES", "['p2', 'p3', 'p7']"], 2, "MODEL.RPN.IN_FEATURES=['p2', 'p3', "
         "'p7'] names ['p7'], which MODEL.BACKBONE.NAME='build_resnet_fpn_backbone' does not "
         "produce; use some of the backbone's features ['p2', 'p3', 'p4', 'p5', 'p6']"),
        (["MODEL.ROI_HEADS.IN_FEATURES", "['res4']"], 2, "MODEL.ROI_HEADS.IN_FEATURES=['res4'] "
         "names ['res4'], which MODEL.BACKBONE.NAME='build_resnet_fpn_backbone' does not"),
        (["MODEL.ROI_HEADS.IN_FEATURES", "['p2', 'p4']"], 2, "MODEL.ROI_HEADS.IN_FEATURES=["
         "'p2', 'p4'] must be consecutive pyramid levels, finest first"),
        (["MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS", "(10.0, 10.0, 5.0)"], 2,
         "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS=[10.0, 10.0, 5.0] must be 4 positive weights"),
        (["MODEL.RPN.BBOX_REG_WEIGHTS", "(1.0, 1.0, 1.0, 1.0, 1.0)"], 2,
         "MODEL.RPN.BBOX_REG_WEIGHTS=[1.0, 1.0, 1.0, 1.0, 1.0] must be 4 positive weights"),
        (["INPUT.MIN_SIZE_TRAIN", "()"], 2, "INPUT.MIN_SIZE_TRAIN=() must hold positive sizes"),
        (["INPUT.MIN_SIZE_TRAIN_SAMPLING", "range"], 2, "INPUT.MIN_SIZE_TRAIN=[128] must be "
         "[low, high] with INPUT.MIN_SIZE_TRAIN_SAMPLING 'range'"),
        (["INPUT.CROP.ENABLED", "True", "INPUT.CROP.SIZE", "[0.9]"], 2,
         "INPUT.CROP.SIZE=[0.9] must be two fractions in (0, 1]"),
        (["SOLVER.STEPS", "(150, 100)"], 2, "SOLVER.STEPS=(150, 100) must be positive and "
         "strictly increasing"),
        (["SOLVER.STEPS", "(150, 200)"], 2, "SOLVER.STEPS=(150, 200) has step(s) [200] at or "
         "after SOLVER.MAX_ITER=200, which would never apply"),
        (["SOLVER.MEGDET.STEP_GAMMAS", "[0.1, 0.5]"], 2, "SOLVER.MEGDET.STEP_GAMMAS=[0.1, 0.5] "
         "needs one factor per step of SOLVER.STEPS=(150,) (1)"),
        (["MODEL.RESNETS.OUT_FEATURES", "['res3', 'res4', 'res5', 'res6']"], 2,
         "MODEL.RESNETS.OUT_FEATURES=['res3', 'res4', 'res5', 'res6'] must name ResNet outputs "
         "(['res6'] are not)"),
        (["MODEL.FPN.IN_FEATURES", "['res2', 'res4', 'res5']"], 2, "MODEL.FPN.IN_FEATURES=["
         "'res2', 'res4', 'res5'] must be consecutive ResNet stages in order"),
        (["MODEL.RESNETS.OUT_FEATURES", "['res3', 'res4', 'res5']"], 2, "MODEL.FPN.IN_FEATURES="
         "['res2', 'res3', 'res4', 'res5'] names ['res2'], which MODEL.RESNETS.OUT_FEATURES="),
        (["MODEL.RESNETS.DEFORM_ON_PER_STAGE", "[False]"], 2,
         "MODEL.RESNETS.DEFORM_ON_PER_STAGE=[False] needs one flag per stage res2..res5 (4)"),
        (["MODEL.RPN.IOU_THRESHOLDS", "[0.7, 0.3]"], 2, "MODEL.RPN.IOU_THRESHOLDS=[0.7, 0.3] "
         "must be IoU values in (0, 1] in increasing order"),
        (["MODEL.ROI_HEADS.IOU_THRESHOLDS", "[0.4, 0.5]"], 2, "MODEL.ROI_HEADS.IOU_LABELS=[0, 1] "
         "needs 3 labels from [-1, 0, 1], one per interval of MODEL.ROI_HEADS.IOU_THRESHOLDS="),
        (["MODEL.RPN.CONV_DIMS", "[256, 0]"], 2, "MODEL.RPN.CONV_DIMS=[256, 0] must be channel "
         "counts of the RPN head's convs, or -1"),
        (["MODEL.META_ARCHITECTURE", "RetinaNet", "MODEL.RETINANET.NUM_CLASSES", "3",
          "MODEL.RETINANET.IN_FEATURES", "['p3', 'p4', 'p5', 'p6', 'p7']"], 2,
         "MODEL.RETINANET.IN_FEATURES=['p3', 'p4', 'p5', 'p6', 'p7'] names ['p7'], which "
         "MODEL.BACKBONE.NAME='build_resnet_fpn_backbone' does not produce"),
        (["MODEL.META_ARCHITECTURE", "RetinaNet", "MODEL.RETINANET.NUM_CLASSES", "3",
          "MODEL.RETINANET.IN_FEATURES", "['p3', 'p4', 'p5', 'p6']",
          "MODEL.ANCHOR_GENERATOR.SIZES", "[[32], [64], [128], [256]]",
          "MODEL.RETINANET.BBOX_REG_WEIGHTS", "(1.0, 1.0)"], 2,
         "MODEL.RETINANET.BBOX_REG_WEIGHTS=[1.0, 1.0] must be 4 positive weights"),
        (["MODEL.ROI_HEADS.NAME", "CascadeROIHeads", "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG",
          "True", "MODEL.ROI_BOX_CASCADE_HEAD.IOUS", "(0.5, 0.6)"], 2,
         "MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS=[[10.0, 10.0, 5.0, 5.0], [20.0, 20.0, "
         "10.0, 10.0], [30.0, 30.0, 15.0, 15.0]] gives 3 stage(s) but "
         "MODEL.ROI_BOX_CASCADE_HEAD.IOUS has 2"),
        (["MODEL.KEYPOINT_ON", "True", "TEST.KEYPOINT_OKS_SIGMAS", "[0.1, 0.2]"], 2,
         "TEST.KEYPOINT_OKS_SIGMAS=[0.1, 0.2] has 2 value(s) but "
         "MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS=17"),
        (["DATASETS.TRAIN", "()"], 2, "DATASETS.TRAIN=[] is empty: nothing to train on"),
        (["TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "()"], 2,
         "TEST.AUG.MIN_SIZES=[] must hold positive sizes with TEST.AUG.ENABLED"),
        # whatever no explicit check covers: the model is built (on meta) in the launcher
        (["MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIAlignV3"], 2,
         "MODEL.META_ARCHITECTURE='GeneralizedRCNN' cannot be built from this config ("),
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
        ["--num-gpus", "2", "--resume", "--config-file", CONFIG, "MEGDET.QUICKSTART.ROOT",
         data_root, "OUTPUT_DIR", str(tmp_path), "MODEL.WEIGHTS", "/no/such/model.pth",
         "MEGDET.ALLOW_PARTIAL_WEIGHTS", "True"]  # the empty checkpoint loads nothing
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


def _train_net_fails_fast(tmp_path, *opts, flags=("--num-gpus", "2", "--config-file", CONFIG)):
    """Real train_net.py: exit 2, one line, no traceback, no worker spawned, within seconds."""
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), *flags,
           "MEGDET.QUICKSTART.ROOT", str(tmp_path / "data"),
           "MEGDET.QUICKSTART.NUM_TRAIN", "8", "MEGDET.QUICKSTART.NUM_VAL", "4",
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
    assert "Traceback" not in stderr and stderr.count("Config error: ") == 1, stderr[-3000:]
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
        ["--num-gpus", "2", "--config-file", CONFIG, "MEGDET.QUICKSTART.ROOT", data_root,
         "MODEL.WEIGHTS", str(path), "MEGDET.STRICT_SHAPES", "False",
         "MEGDET.ALLOW_PARTIAL_WEIGHTS", "True"]  # it holds one tensor of the model
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


# ----------------------------------------------------------------------------------------------
# Issue #12: config files, data files, output folder and checkpoints, each fault one line.
# ----------------------------------------------------------------------------------------------


def _yaml(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no --config-file", "--config-file is missing; name a YAML config, e.g. --config-file"),
        ("no such file", "--config-file '{tmp}/nope.yaml' does not exist; give a YAML file"),
        ("syntax", "config file '{tmp}/bad.yaml', line 4 column 1: expected ',' or ']', but got"),
        ("unknown key", "MODEL.RESNETS.DEEPTH in '{tmp}/bad.yaml' is not a config key (did you "
         "mean ['MODEL.RESNETS.DEPTH'"),
        ("missing _BASE_", "config file '{tmp}/bad.yaml' has _BASE_: 'nope.yaml', i.e. "
         "'{tmp}/nope.yaml', which does not exist; fix the path"),
        ("type", "SOLVER.MAX_ITER=ten in '{tmp}/bad.yaml' is of type str where int is expected"),
        ("set after the preset", "SOLVER.MAX_ITER=10 is set in '{tmp}/bad.yaml', but SOLVER."
         "MEGDET.SCHEDULE='normal' derives SOLVER.MAX_ITER=22"),
    ],
)  # fmt: skip
def test_config_file_fault_is_one_line_naming_the_file(capsys, data_root, tmp_path, case, expected):
    base = f"_BASE_: {CONFIG}\n"
    preset = _yaml(tmp_path, "preset.yaml", base + "SOLVER:\n  MEGDET:\n    SCHEDULE: normal\n")
    text = {
        "syntax": base + "MODEL:\n  WEIGHTS: [a\n",
        "unknown key": base + "MODEL:\n  RESNETS:\n    DEEPTH: 50\n",
        "missing _BASE_": "_BASE_: nope.yaml\n",
        "type": base + "SOLVER:\n  MAX_ITER: ten\n",
        "set after the preset": f"_BASE_: {preset}\nSOLVER:\n  MAX_ITER: 10\n",
    }.get(case, "")
    config = {"no --config-file": "", "no such file": str(tmp_path / "nope.yaml")}.get(
        case, _yaml(tmp_path, "bad.yaml", text)
    )
    message = config_error(capsys, data_root, config=config)
    assert message.startswith(expected.format(tmp=tmp_path)), message


def test_preset_replaces_values_of_the_file_that_chooses_it(data_root, tmp_path):
    """Base-MegDet-RCNN-FPN.yaml sets MAX_ITER / STEPS for SCHEDULE '' next to SCHEDULE normal."""
    text = f"_BASE_: {CONFIG}\nSOLVER:\n  MAX_ITER: 10\n  WARMUP_ITERS: 2\n  MEGDET:\n"
    config = _yaml(tmp_path, "same.yaml", text + "    SCHEDULE: normal\n")
    args = default_argument_parser().parse_args(
        ["--num-gpus", "2", "--config-file", config, "MEGDET.QUICKSTART.ROOT", data_root,
         "MEGDET.QUICKSTART.NUM_TRAIN", "8", "MEGDET.QUICKSTART.NUM_VAL", "4"]
    )  # fmt: skip
    assert train_net.load_config(args).SOLVER.MAX_ITER == 22


@pytest.fixture(scope="module")
def quickstart_folder(data_root):
    """The generated quickstart split folder (8 train / 4 val images), to copy and break."""
    from megdet_d2.data import TRAIN_NAME, prepare_quickstart_data

    json_file, _ = prepare_quickstart_data(data_root, 8, 4, 128, 0)[TRAIN_NAME]
    return os.path.dirname(json_file)


def _edit_json(path, edit):
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


def _set(records, index, **values):
    records[index].update(values)


DATA_FAULTS = {
    "category not in categories": (
        lambda d: _edit_json(d / "train.json", lambda j: _set(j["annotations"], 0, category_id=7)),
        "DATASETS.TRAIN names 'megdet_shapes_train': json_file '{d}/train.json': annotation 1 "
        "(image 1) has category_id 7, which is not in 'categories' (ids [1, 2, 3]); add",
    ),
    "missing image": (
        lambda d: (d / "train" / "000002.png").unlink(),
        "DATASETS.TRAIN names 'megdet_shapes_train': json_file '{d}/train.json' lists 1 image "
        "file(s) that do not exist: '{d}/train/000002.png'; put them under image_root",
    ),
    "zero-byte image": (
        lambda d: (d / "val" / "000003.png").write_bytes(b""),
        "DATASETS.TEST names 'megdet_shapes_val': json_file '{d}/val.json' lists 1 empty "
        "(0-byte) image file(s): '{d}/val/000003.png'; copy them again",
    ),
    "truncated test json": (
        lambda d: (d / "val.json").write_bytes((d / "val.json").read_bytes()[:300]),
        "DATASETS.TEST names 'megdet_shapes_val': json_file '{d}/val.json' is not valid JSON "
        "(Unterminated string starting at at line 1, column 299 of 300 bytes: probably truncated)",
    ),
    "json width differs from the file": (
        lambda d: _edit_json(d / "train.json", lambda j: _set(j["images"], 1, width=200)),
        "DATASETS.TRAIN names 'megdet_shapes_train': json_file '{d}/train.json' gives the wrong "
        "size for 1 of 8 sampled images: '{d}/train/000002.png' is 128x128 but the json says "
        "200x128; fix width/height",
    ),
    "no annotations": (
        lambda d: _edit_json(d / "train.json", lambda j: j.update(annotations=[])),
        "DATASETS.TRAIN names 'megdet_shapes_train', whose json_file '{d}/train.json' has no "
        "image with a (non-crowd) annotation: nothing to train on",
    ),
    "annotation image_id names no image": (
        lambda d: _edit_json(d / "train.json", lambda j: _set(j["annotations"], 2, image_id=99)),
        "DATASETS.TRAIN names 'megdet_shapes_train': json_file '{d}/train.json': annotation 3 "
        "has image_id 99, which is not in 'images' (8 images); add that image or remove",
    ),
    "test annotation image_id names no image": (
        lambda d: _edit_json(d / "val.json", lambda j: _set(j["annotations"], 0, image_id=0)),
        "DATASETS.TEST names 'megdet_shapes_val': json_file '{d}/val.json': annotation 1 has "
        "image_id 0, which is not in 'images' (4 images); add that image or remove",
    ),
    "test annotation category names no category": (
        lambda d: _edit_json(d / "val.json", lambda j: _set(j["annotations"], 1, category_id=0)),
        "DATASETS.TEST names 'megdet_shapes_val': json_file '{d}/val.json': annotation 2 (image "
        "1) has category_id 0, which is not in 'categories' (ids [1, 2, 3]); add",
    ),
    "test set with an empty annotations list": (
        lambda d: _edit_json(d / "val.json", lambda j: j.update(annotations=[])),
        "DATASETS.TEST names 'megdet_shapes_val', whose json_file '{d}/val.json' has an "
        "'annotations' list but no (non-crowd) annotation: COCO evaluation would compute "
        "nothing (every metric nan); add the annotations, or remove the 'annotations' key",
    ),
    "test set with crowd annotations only": (
        lambda d: _edit_json(
            d / "val.json", lambda j: [a.update(iscrowd=1) for a in j["annotations"]]
        ),
        "DATASETS.TEST names 'megdet_shapes_val', whose json_file '{d}/val.json' has an "
        "'annotations' list but no (non-crowd) annotation",
    ),
    "not an image": (
        lambda d: (d / "train" / "000001.png").write_text("hello"),
        "DATASETS.TRAIN names 'megdet_shapes_train': image '{d}/train/000001.png' (json_file "
        "'{d}/train.json') is not an image PIL can read (UnidentifiedImageError",
    ),
}


@pytest.mark.parametrize("fault", sorted(DATA_FAULTS))
def test_data_fault_is_one_line_naming_the_file(capsys, quickstart_folder, tmp_path, fault):
    """Checked in the launcher, test sets included (before: a traceback, for a test set only
    after training finished)."""
    root = tmp_path / "data"
    folder = root / os.path.basename(quickstart_folder)
    shutil.copytree(quickstart_folder, folder)
    damage, expected = DATA_FAULTS[fault]
    damage(folder)
    message = config_error(capsys, str(root))
    assert message.startswith(expected.format(d=folder)), message


def test_test_set_without_annotations_key_is_for_predictions(quickstart_folder, tmp_path):
    """No 'annotations' key: detectron2's evaluator only writes predictions; allowed."""
    root = tmp_path / "data"
    folder = root / os.path.basename(quickstart_folder)
    shutil.copytree(quickstart_folder, folder)
    _edit_json(folder / "val.json", lambda j: j.pop("annotations"))
    args = default_argument_parser().parse_args(
        ["--config-file", CONFIG, "--eval-only", "MEGDET.QUICKSTART.ROOT", str(root),
         "MEGDET.QUICKSTART.NUM_TRAIN", "8", "MEGDET.QUICKSTART.NUM_VAL", "4"]
    )  # fmt: skip
    assert train_net.load_config(args).DATASETS.TEST == ("megdet_shapes_val",)
    with open(folder / "val.json") as f:
        assert "annotations" not in json.load(f)  # the checked file is the edited one


def test_eval_only_checks_the_test_set_only(capsys, quickstart_folder, tmp_path):
    root = tmp_path / "data"
    folder = root / os.path.basename(quickstart_folder)
    shutil.copytree(quickstart_folder, folder)
    _edit_json(folder / "train.json", lambda j: j.update(annotations=[]))  # not read
    (folder / "val.json").write_text("")
    message = config_error(capsys, str(root), flags=["--eval-only"])
    assert message == f"DATASETS.TEST names 'megdet_shapes_val': json_file '{folder}/val.json' " \
        "is empty (0 bytes); copy or regenerate it"  # fmt: skip


def test_output_dir_under_a_file_or_not_writable(capsys, data_root, tmp_path):
    (tmp_path / "file").write_text("x")
    message = config_error(capsys, data_root, "OUTPUT_DIR", str(tmp_path / "file" / "out"))
    assert message == (f"OUTPUT_DIR='{tmp_path}/file/out' cannot be a folder: '{tmp_path}/file' "
                       "is a file; choose another OUTPUT_DIR")  # fmt: skip
    # sysfs refuses new files even to root (the tests may run as root, so no chmod)
    message = config_error(capsys, data_root, "OUTPUT_DIR", "/sys/megdet_out")
    assert message.startswith("OUTPUT_DIR='/sys/megdet_out' is not writable ('/sys': ")
    assert not os.path.exists("/sys/megdet_out")


def test_checkpoint_that_is_not_one_or_of_another_model(capsys, data_root, tmp_path):
    text = tmp_path / "weights.pth"
    text.write_text("hello")
    message = config_error(capsys, data_root, "MODEL.WEIGHTS", str(text))
    assert message.startswith(f"MODEL.WEIGHTS='{text}' cannot be read as a checkpoint (")
    torchvision = tmp_path / "resnet18.pth"  # torchvision names: nothing matches detectron2's
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.bias": torch.zeros(10)}, torchvision)
    message = config_error(capsys, data_root, "MODEL.WEIGHTS", str(torchvision))
    assert message.startswith(f"MODEL.WEIGHTS='{torchvision}': the checkpoint provides 0 of the "
                              "model's ")  # fmt: skip
    assert "MEGDET.ALLOW_PARTIAL_WEIGHTS True" in message
    args = default_argument_parser().parse_args(
        ["--config-file", CONFIG, "MEGDET.QUICKSTART.ROOT", data_root, "MODEL.WEIGHTS",
         str(torchvision), "MEGDET.ALLOW_PARTIAL_WEIGHTS", "True"]
    )  # fmt: skip
    train_net.load_config(args)  # asked for explicitly: allowed


def test_coco_json_with_polygons_is_checked_like_the_original(tmp_path):
    """The check parses the json with polygons emptied; what it reads is unchanged."""
    from megdet_d2.data.coco_check import _load_json

    data = {"images": [{"id": 1, "file_name": "a.png", "width": 4, "height": 3}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2],
                             "segmentation": [[0, 0, 2.5, 0, 2, 2e0], [1, -1, 0, 0, 1, 1]],
                             "iscrowd": 0},
                            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2],
                             "segmentation": {"counts": "abc", "size": [3, 4]}, "iscrowd": 1}],
            "categories": [{"id": 1, "name": "segmentation: [1]"}]}  # fmt: skip
    path = tmp_path / "a.json"
    path.write_text(json.dumps(data))
    loaded = _load_json(str(path))
    assert loaded["annotations"][0]["segmentation"] == []
    for record in loaded["annotations"]:
        record.pop("segmentation")
    for record in data["annotations"]:
        record.pop("segmentation")
    assert loaded == data


@pytest.mark.parametrize(
    "case",
    ["--num-gpus 0", "YAML syntax", "KEY without VALUE", "test json", "list key", "dangling id"],
)
def test_train_net_exits_with_one_line_before_spawning(tmp_path, case):
    flags, opts = ["--num-gpus", "2", "--config-file", CONFIG], []
    if case == "list key":  # issue #20: was an AssertionError from each worker ~13 s later
        opts = ["MODEL.PIXEL_MEAN", "[103.5, 116.3]"]
        expected = "Config error: MODEL.PIXEL_MEAN=[103.5, 116.3] has 2 value(s) but"
    elif case == "dangling id":  # issue #20: was dropped silently; nan everywhere, status 0
        from megdet_d2.data import TRAIN_NAME, prepare_quickstart_data

        json_file, _ = prepare_quickstart_data(str(tmp_path / "data"), 8, 4, 128, 0)[TRAIN_NAME]
        _edit_json(json_file, lambda j: _set(j["annotations"], 0, image_id=123))
        expected = (f"Config error: DATASETS.TRAIN names '{TRAIN_NAME}': json_file '{json_file}'"
                    ": annotation 1 has image_id 123, which is not in 'images'")  # fmt: skip
    elif case == "--num-gpus 0":
        flags[1] = "0"
        expected = "Config error: --num-gpus=0 must be at least 1"
    elif case == "YAML syntax":
        flags[3] = _yaml(tmp_path, "bad.yaml", "SOLVER:\n  STEPS: (1,\n   MAX_ITER: 3\n")
        expected = f"Config error: config file '{tmp_path}/bad.yaml', line 3 column 12: mapping"
    elif case == "KEY without VALUE":
        opts = ["SOLVER.BASE_LR", "0.1", "SOLVER.MAX_ITER"]
        expected = "Config error: SOLVER.MAX_ITER on the command line has no value"
    else:  # a broken test set is found before training, not after it
        from megdet_d2.data import VAL_NAME, prepare_quickstart_data

        json_file, _ = prepare_quickstart_data(str(tmp_path / "data"), 8, 4, 128, 0)[VAL_NAME]
        with open(json_file, "r+") as f:
            f.truncate(200)
        expected = f"Config error: DATASETS.TEST names '{VAL_NAME}': json_file '{json_file}' is"
    last = _train_net_fails_fast(tmp_path, *opts, flags=flags)
    assert last.startswith(expected), last


@pytest.mark.parametrize("workers", [0, 2])  # 2: read in loader workers, as users run
def test_image_the_loader_cannot_read_ends_the_job_with_one_line(tmp_path, workers):
    """The start-up check reads headers only: a PNG cut after its header passes it, and the data
    loader of one worker finds it (in the process, or in a loader worker with aspect-ratio
    grouping); that worker prints one line, the job ends with status 2, and its peer, whose
    collective then fails, prints no traceback."""
    from megdet_d2.data import TRAIN_NAME, prepare_quickstart_data

    _, image_dir = prepare_quickstart_data(str(tmp_path / "data"), 8, 4, 128, 0)[TRAIN_NAME]
    png = os.path.join(image_dir, "000003.png")
    with open(png, "r+b") as f:
        f.truncate(os.path.getsize(png) // 2)
    cmd = [
        sys.executable,
        os.path.join(REPO, "train_net.py"),
        "--num-gpus",
        "2",
        "--dist-url",
        "auto",
        "--config-file",
        CONFIG,
        "MEGDET.QUICKSTART.ROOT",
        str(tmp_path / "data"),
        "MEGDET.QUICKSTART.NUM_TRAIN",
        "8",
        "MEGDET.QUICKSTART.NUM_VAL",
        "4",
        "SOLVER.MAX_ITER",
        "2",  # = all 8 images
        "SOLVER.WARMUP_ITERS",
        "1",
        "SOLVER.STEPS",
        "()",
        "OUTPUT_DIR",
        str(tmp_path / "out"),
        "DATALOADER.NUM_WORKERS",
        str(workers),
        "DATALOADER.ASPECT_RATIO_GROUPING",
        "True",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Config error: image '{png}' (image_id 3) cannot be used: OSError: "
                           "image file is truncated"), last  # fmt: skip
    assert proc.stderr.count("Config error: ") == 1


def test_torchrun_prints_a_config_error_once(tmp_path):
    """Every torchrun worker runs the launcher's checks; only local rank 0 prints. torchrun's
    own ChildFailedError summary follows (its process cannot be silenced from a worker) and
    names the same line as root cause, read from the worker's error file."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           os.path.join(REPO, "train_net.py"), "--config-file", CONFIG,
           "MEGDET.QUICKSTART.ROOT", str(tmp_path / "data"), "MEGDET.QUICKSTART.NUM_TRAIN",
           "8", "MEGDET.QUICKSTART.NUM_VAL", "4", "MEGDET.LOG_PERIOD", "0"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    line = "Config error: MEGDET.LOG_PERIOD=0 must be positive (iterations between metric writes)"
    assert proc.returncode != 0
    printed = [x for x in proc.stderr.splitlines() if x.startswith("Config error: ")]
    assert len(printed) == 1 and printed[0].startswith(line), proc.stderr[-3000:]
    assert f"traceback : {line}" in proc.stderr  # torchrun's summary: the root cause
    assert "exitcode  : 2" in proc.stderr


def _read_broken(dataset_dict):
    raise OSError(f"cannot identify image file {dataset_dict['file_name']!r}")


def test_error_raised_in_a_dataloader_worker_keeps_its_one_line(tmp_path):
    """With DATALOADER.NUM_WORKERS > 0 torch re-raises the error with the worker's traceback as
    its message; the line printed is still the original one."""
    from megdet_d2.engine.trainer import NamedImageErrors
    from megdet_d2.errors import config_error_line

    dataset = [{"file_name": str(tmp_path / "a.png"), "image_id": 7}]
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=1, collate_fn=NamedImageErrors(_read_broken)
    )
    with pytest.raises(ConfigError) as exc:
        next(iter(loader))
    assert "Original Traceback" in str(exc.value)  # torch's wrapping
    assert config_error_line(exc.value) == (
        f"image '{tmp_path}/a.png' (image_id 7) cannot be used: OSError: cannot identify image "
        f"file '{tmp_path}/a.png'; replace the file, or fix or remove its entry in the dataset's "
        "json"
    )


# detectron2's own model-zoo configs, one of each kind of model: the list-key checks refuse none
# of them (a false refusal would block a valid run). Deformable convs are left out: without
# detectron2's compiled _C they cannot be built here (nor trained), which the check says.
ZOO = [
    "COCO-Detection/faster_rcnn_R_50_C4_1x.yaml",
    "COCO-Detection/faster_rcnn_R_50_DC5_1x.yaml",
    "COCO-Detection/retinanet_R_50_FPN_1x.yaml",
    "COCO-Detection/rpn_R_50_FPN_1x.yaml",
    "COCO-Detection/fast_rcnn_R_50_FPN_1x.yaml",
    "COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml",
    "COCO-PanopticSegmentation/panoptic_fpn_R_50_1x.yaml",
    "Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml",
    "Misc/semantic_R_50_FPN_1x.yaml",
    "Misc/mask_rcnn_R_50_FPN_3x_gn.yaml",
]


@pytest.mark.parametrize("name", ZOO)
def test_list_key_checks_pass_detectron2_model_zoo_configs(name):
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    from megdet_d2 import add_megdet_config
    from megdet_d2.engine.list_keys import check_list_keys

    cfg = get_cfg()
    add_megdet_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file(name))
    cfg.MODEL.DEVICE = "cpu"
    assert check_list_keys(cfg, training=True) is not None  # the model, built on meta

"""experiments/: batch_scaling.py's commands and its smoke version (pretraining a few steps, two
tiny runs, resuming), pretrain_backbone.py's checkpoint."""

import json
import os
import sys

import pytest
import torch
from detectron2.modeling import build_model

from megdet_d2.engine import MegDetCheckpointer
from megdet_d2.utils import run_recorded
from tests.utils.scripts import load_script

batch_scaling = load_script("experiments/batch_scaling.py")
pretrain_backbone = load_script("experiments/pretrain_backbone.py")
bn_stats_check = load_script("experiments/bn_stats_check.py")
SMOKE_PRETRAIN = ["--steps", "30", "--batch", "8", "--num-images", "8", "--num-val", "4"]


def _value(cmd, key):
    return cmd[cmd.index(key) + 1]


def test_batch_scaling_commands(tmp_path):
    """Issue #26's runs: r = 0.005 at batch 4, 3,200 images an epoch (100 updates at 8x, a
    one-epoch warmup of 100), the core's first seed and the update-count trend first."""
    cmds = batch_scaling.main(["--dry-run", "--out-dir", str(tmp_path)])
    assert list(cmds) == [
        "base_s1", "recipe_8x_s1", "base_n800_s1", "recipe_8x_n800_s1", "base_n1600_s1",
        "recipe_8x_n1600_s1", "frozen_8x_n800_s1", "frozen_8x_n1600_s1", "base_s2",
        "recipe_8x_s2", "base_s3", "recipe_8x_s3", "recipe_4x_s1", "recipe_16x_s1",
        "frozen_8x_s1", "base_noise_s1", "recipe_8x_long_s1", "base_long_s1",
    ]  # fmt: skip
    for name, batch, warmup, reference, norm, fpn, images, schedule, epochs in [
        ("base_s1", "4", "0", "4", "FrozenBN", "", "3200", "normal", "8"),
        ("recipe_8x_s2", "32", "100", "4", "CGBN", "CGBN", "3200", "normal", "8"),
        ("recipe_8x_n800_s1", "32", "25", "4", "CGBN", "CGBN", "800", "normal", "8"),
        ("base_n1600_s1", "4", "0", "4", "FrozenBN", "", "1600", "normal", "8"),
        ("recipe_16x_s1", "64", "50", "4", "CGBN", "CGBN", "3200", "normal", "8"),
        ("frozen_8x_s1", "32", "100", "4", "FrozenBN", "", "3200", "normal", "8"),
        ("frozen_8x_n800_s1", "32", "25", "4", "FrozenBN", "", "800", "normal", "8"),
        ("recipe_8x_long_s1", "32", "100", "4", "CGBN", "CGBN", "3200", "long", "13"),
    ]:  # fmt: skip
        cmd = cmds[name]
        assert _value(cmd, "SOLVER.IMS_PER_BATCH") == batch
        assert _value(cmd, "SOLVER.BASE_LR") == "0.005"
        assert _value(cmd, "SOLVER.WARMUP_ITERS") == warmup
        assert _value(cmd, "SOLVER.MEGDET.REFERENCE_BATCH_SIZE") == reference
        assert (_value(cmd, "MODEL.RESNETS.NORM"), _value(cmd, "MODEL.FPN.NORM")) == (norm, fpn)
        assert _value(cmd, "MEGDET.QUICKSTART.NUM_TRAIN") == images
        assert _value(cmd, "SOLVER.MEGDET.SCHEDULE") == schedule
        assert _value(cmd, "SOLVER.MEGDET.EPOCHS") == epochs
        assert _value(cmd, "SEED") == name[-1] and _value(cmd, "MODEL.WEIGHTS")
    assert _value(cmds["base_noise_s1"], "MEGDET.NOISE_SCALE") == "True"
    assert "MEGDET.NOISE_SCALE" not in cmds["base_s1"]
    # issue #18's kinds stay selectable, at the settings given
    old = ["--runs", "bn_base", "recipe_8x_warmup3", "--num-train", "800", "--base-lr", "0.02"]
    old = batch_scaling.main(["--dry-run", "--out-dir", str(tmp_path), *old])
    assert len(old) == 6 and _value(old["recipe_8x_warmup3_s2"], "SOLVER.WARMUP_ITERS") == "75"
    assert _value(old["bn_base_s3"], "SOLVER.BASE_LR") == "0.02"


@pytest.mark.parametrize("argv", [["--runs", "b4"], ["--epochs", "1"], ["--num-train", "16"]])
def test_batch_scaling_bad_arguments(argv):
    with pytest.raises(SystemExit):
        batch_scaling.parse_args(argv)


@pytest.fixture(scope="module")
def smoke_pretrained(tmp_path_factory):
    """pretrain_backbone.py a few steps, with the settings batch_scaling.py --smoke uses (so
    the smoke experiment finds it cached)."""
    out = tmp_path_factory.mktemp("bs")
    pth, result = pretrain_backbone.main(
        ["--out-dir", str(out / "pretrained"), "--threads", "1", *SMOKE_PRETRAIN]
    )
    return out, pth, result


@pytest.mark.parametrize("norm", ["CGBN", "FrozenBN"])
def test_pretrained_checkpoint_loads_with_only_the_heads_missing(smoke_pretrained, norm):
    _, pth, result = smoke_pretrained
    assert 0 <= result["top1"] <= 100 and result["seconds"] > 0
    assert pretrain_backbone.main(["--out-dir", os.path.dirname(pth), *SMOKE_PRETRAIN])[0] == pth
    cfg = pretrain_backbone.load_config(pretrain_backbone.CONFIG)
    cfg.MODEL.RESNETS.NORM = norm  # the base runs' FrozenBN too
    model = build_model(cfg)
    checkpointer = MegDetCheckpointer(model)
    incompatible = checkpointer._load_model(torch.load(pth, weights_only=True))  # as load() does
    # num_batches_tracked: a counter FrozenBN does not keep (unused with momentum 0.1)
    unexpected, missing = (
        [k for k in keys if not k.endswith("num_batches_tracked")]
        for keys in (incompatible.unexpected_keys, incompatible.missing_keys)
    )
    assert not unexpected and not incompatible.incorrect_shapes
    heads = ("backbone.fpn_", "backbone.top_block", "proposal_generator.", "roi_heads.")
    assert missing and all(k.startswith(heads) for k in missing), missing
    saved = torch.load(pth, weights_only=True)["model"]
    key = "backbone.bottom_up.res4.0.conv1.norm.running_var"  # BN statistics, trained
    assert torch.equal(model.state_dict()[key], saved[key]) and not torch.all(saved[key] == 1)


def test_batch_scaling_smoke(smoke_pretrained):
    """base + recipe_4x, 2 epochs of 48 images: real train_net.py (2 processes), records,
    table, figures, docs; a second call skips the finished runs."""
    out, _, _ = smoke_pretrained
    docs = out / "docs"
    argv = [
        "--smoke",
        "--out-dir",
        str(out),
        "--docs",
        "--docs-dir",
        str(docs),
        "--keep-checkpoints",
    ]
    data = batch_scaling.main(argv)
    runs = {r["name"]: r for r in data["runs"]}
    assert list(runs) == ["base_s1", "recipe_4x_s1"]
    for name, iterations, bn, norm in (
        ("base_s1", 24, 0, "FrozenBN"),
        ("recipe_4x_s1", 6, 16, "CGBN"),
    ):
        r = runs[name]
        assert r["exit"] == 0, (out / name / "train.log").read_text()[-3000:]
        assert (r["iterations"], r["bn_size"], r["norm"], r["init"]) == (
            iterations,
            bn,
            norm,
            "pretrained",
        )
        assert len(r["mmAP_per_epoch"]) == 2 and r["mmAP"] == r["mmAP_per_epoch"][-1]
        assert r["wall_s"] >= r["train_s"] > 0 and r["seed"] == 1
    metrics = [json.loads(line) for line in open(out / "recipe_4x_s1" / "metrics.json")]
    assert all("grad_norm" in m and "lr" in m for m in metrics if "total_loss" in m)
    table, gaps, losses = (t.splitlines() for t in (out / "table.md").read_text().split("\n\n"))
    assert len(table) == 4 and table[3].startswith(
        "| recipe_4x | 16 | 16 | CGBN | k*r | yes | 48 | 3 | 6 |"
    )
    assert len(gaps) == 3 and gaps[2].startswith("| recipe_4x | 16 | 3 | ")  # gap to base_s1
    assert len(losses) == 4 and losses[3].startswith("| recipe_4x | ")  # last-epoch loss
    assert json.loads((docs / "batch_scaling.json").read_text())["runs"] == data["runs"]
    assert (docs / "batch_scaling.png").stat().st_size > 10_000
    again = batch_scaling.main(argv)  # resumable: both records found, nothing retrained
    assert again["runs"] == data["runs"]
    # a fresh clone: the archived runs (records, config, thinned metrics) are restored, so
    # nothing is pretrained or trained, and the report is the same
    assert (out / "records" / "base_s1" / "metrics.json").stat().st_size < 100_000
    fresh = out / "fresh"
    restored = batch_scaling.main(["--smoke", "--out-dir", str(fresh),
                                   "--records-dir", str(out / "records")])  # fmt: skip
    assert restored["runs"] == data["runs"] and not (fresh / "pretrained").exists()
    assert (fresh / "curves.png").stat().st_size > 10_000
    # --report-only: what has finished, nothing trained (recipe_8x has no record)
    only = ["--smoke", "--report-only", "--runs", "base", "recipe_4x", "recipe_8x"]
    only = batch_scaling.main([*only, "--out-dir", str(out / "only"),
                               "--records-dir", str(out / "records")])  # fmt: skip
    assert only["runs"] == data["runs"] and not (out / "only" / "recipe_8x_s1").exists()
    # bn_stats_check.py on a kept checkpoint: evaluates it as trained and re-estimated
    report = bn_stats_check.main([str(out / "recipe_4x_s1"), "--batches", "2"])
    assert report["bn_layers"] == 23  # res3-res5 (stem, res2 frozen) and the FPN's 8 convs
    as_trained = runs["recipe_4x_s1"]["mmAP"] or 0.0  # None: no detection, scored 0
    assert report["mmAP_mmAR_running_stats"][0] == pytest.approx(as_trained, abs=0.01)
    assert all(0 <= v <= 100 for v in report["mmAP_mmAR_re_estimated_stats"])
    with pytest.raises(SystemExit, match="no BN layer with batch statistics"):
        bn_stats_check.main([str(out / "base_s1"), "--batches", "1"])  # FrozenBN only


def test_bn_statistics_gap_in_standard_deviations():
    """The gap report: mean shift in (re-estimated) standard deviations, variance ratio."""
    bn = torch.nn.BatchNorm2d(4)
    bn.running_mean.fill_(1.0)
    bn.running_var.fill_(4.0)  # std 2
    before = {"bn": (torch.full((4,), 2.0), torch.full((4,), 8.0))}
    row = bn_stats_check.statistics_gap(before, {"bn": bn})[0]
    assert row == {"layer": "bn", "mean_shift_std": 0.5, "var_ratio": 2.0}


def test_table_counts_a_run_without_detections_as_zero():
    """A finished run that detects nothing scores 0 in the mean (not left out); a failed run
    has no score, and one that diverged says where."""

    def rec(seed, ap, exit=0):
        return {"kind": "recipe_8x", "batch": 32, "bn_size": 32, "norm": "CGBN", "lr": "k*r",
                "warmup": True, "iterations": 200, "train_s": 1.0, "wall_s": 2.0, "seed": seed,
                "mmAP": ap, "mmAR": ap, "mmAP_per_epoch": [ap, ap], "exit": exit}  # fmt: skip

    row = batch_scaling.table([rec(1, None), rec(2, 6.0), rec(3, 24.0)]).splitlines()[2]
    assert "| 10.0 ± 12.5 (0.0, 6.0, 24.0) |" in row and "| 10.0 / 10.0 | 0,0,0 |" in row
    row = batch_scaling.table([rec(1, None, exit=1), rec(2, 6.0)]).splitlines()[2]
    assert "| 6.0 |" in row and row.endswith("| 1,0 |")
    diverged = dict(rec(1, None, exit=1), diverged=True, iterations=32)
    row = batch_scaling.table([diverged, rec(2, 6.0)]).splitlines()[2]
    assert "| 6.0; diverged at iteration 32 |" in row
    assert "| diverged at iteration 32 |" in batch_scaling.table([diverged]).splitlines()[2]
    # the warmup column: one epoch "yes" (also for records from before warmup_epochs), else N
    longer = dict(rec(1, 6.0), kind="recipe_8x_warmup3", warmup_epochs=3)
    rows = batch_scaling.table([rec(1, 6.0), longer]).splitlines()[2:]
    # records from before issue #26 name no epoch size: "—"
    assert "| CGBN | k*r | yes | — | — | 200 |" in rows[0]
    assert "| k*r | 3 epochs | — | — | 200 |" in rows[1]


def test_update_count_trend():
    """The gap to the base per epoch size: seed 1 and the mean, and frozen_8x's where it ran;
    sizes without both core kinds, the long shape and other kinds (recipe_8x_nowarmup is not
    recipe_8x, frozen_8x_halflr not frozen_8x) stay out."""

    def rec(kind, images, seed, ap, schedule="normal"):
        batch = 32 if "8x" in kind else 4
        return {"kind": kind, "num_train": images, "seed": seed, "mmAP": ap, "exit": 0,
                "schedule": schedule, "updates_per_epoch": images // batch,
                "iterations": 8 * images // batch}  # fmt: skip

    records = [
        rec("base", 3200, 1, 50.0), rec("recipe_8x", 3200, 1, 47.0),
        rec("base", 3200, 2, 52.0), rec("recipe_8x", 3200, 2, None),  # no detection: 0
        rec("base_n800", 800, 1, 48.0), rec("recipe_8x_n800", 800, 1, 20.0),
        rec("base_n1600", 1600, 1, 49.0),  # its recipe_8x not run yet
        rec("recipe_8x_nowarmup", 3200, 1, 1.0), rec("recipe_8x_long", 3200, 1, 2.0, "long"),
        rec("frozen_8x_n800", 800, 1, 45.0), rec("frozen_8x_halflr", 3200, 1, 3.0),
        rec("frozen_8x_n1600", 1600, 1, 46.0),  # no recipe_8x at 1,600: no row
    ]  # fmt: skip
    rows = batch_scaling.trend(records)
    assert [(t["images"], t["updates_per_epoch"], t["updates"]) for t in rows] == [
        (800, 25, 200), (3200, 100, 800)
    ]  # fmt: skip
    assert (rows[1]["base_s1"], rows[1]["recipe_8x_s1"]) == (50.0, 47.0)
    assert (rows[1]["base_mean"], rows[1]["recipe_8x_mean"], rows[1]["seeds"]) == (
        51.0,
        23.5,
        (2, 2),
    )
    text = batch_scaling.trend_table(rows).splitlines()
    assert (rows[0]["frozen_8x_s1"], rows[1]["frozen_8x_s1"]) == (45.0, None)
    assert text[2] == "| 800 | 25 | 200 | 48.0 | 20.0 | -28.0 | -28.0 (1, 1) | 45.0 | -3.0 |"
    assert text[3] == "| 3200 | 100 | 800 | 50.0 | 47.0 | -3.0 | -27.5 (2, 2) | — | — |"


def test_a_diverged_run_is_kept_and_not_run_again(tmp_path):
    """A run that stopped on a FloatingPointError diverged: a result (Table 2's "failed"), not
    run again and restored from the archive like a finished run; a crash is run again."""
    crash = [sys.executable, "-c", "raise SystemExit(3)"]
    diverge = [sys.executable, "-c", "raise FloatingPointError('Training has diverged.')"]
    calls = []

    def make_record(run_dir, rc, wall):
        calls.append(rc)
        return {"exit": rc, "diverged": batch_scaling.diverged(run_dir, rc)}

    out = str(tmp_path / "out")
    assert run_recorded("a", crash, out, out, make_record) == {"exit": 3, "diverged": False}
    assert run_recorded("a", diverge, out, out, make_record) == {"exit": 1, "diverged": True}
    assert run_recorded("a", crash, out, out, make_record)["diverged"] and calls == [3, 1]
    assert not batch_scaling.diverged(os.path.join(out, "a"), 0)

    args = batch_scaling.parse_args(["--out-dir", out, "--records-dir", str(tmp_path / "rec")])
    name = "frozen_8x_n800_s1"
    rec = {"exit": 1, "diverged": True, **batch_scaling.settings(args, "frozen_8x_n800")}
    os.makedirs(tmp_path / "rec" / name)
    for file in batch_scaling.ARCHIVED:
        (tmp_path / "rec" / name / file).write_text(json.dumps(rec))
    assert batch_scaling.restore(args, name) and os.path.isfile(
        os.path.join(out, name, "train.log")
    )
    os.remove(os.path.join(out, name, "record.json"))
    (tmp_path / "rec" / name / "record.json").write_text(json.dumps(dict(rec, diverged=False)))
    assert not batch_scaling.restore(args, name)  # a crash is not a result


def test_batch_gaps_on_the_same_images():
    """Each recipe batch's gap to the base's mean at the series' epoch size, with its updates
    per epoch; the long shape, the trend's sizes and batches without a run stay out."""

    def rec(kind, batch, ap, schedule="normal"):
        return {"kind": kind, "batch": batch, "mmAP": ap, "exit": 0, "schedule": schedule,
                "updates_per_epoch": 3200 // batch}  # fmt: skip

    records = [
        rec("base", 4, 60.0), rec("base", 4, 62.0), rec("recipe_8x", 32, 58.0),
        rec("recipe_8x", 32, None), rec("recipe_4x", 16, 60.5),  # no detection: 0
        rec("recipe_8x_long", 32, 70.0, "long"), rec("recipe_8x_n800", 32, 1.0),
    ]  # fmt: skip
    points = batch_scaling.batch_gaps(records)
    assert [(p["kind"], p["updates_per_epoch"], p["gap"], p["seeds"]) for p in points] == [
        ("recipe_4x", 200, -0.5, 1), ("recipe_8x", 100, -32.0, 2)
    ]  # fmt: skip
    assert batch_scaling.batch_gap_table(points).splitlines()[2:] == [
        "| recipe_4x | 16 | 200 | -0.5 (1) |", "| recipe_8x | 32 | 100 | -32.0 (2) |"
    ]  # fmt: skip
    assert batch_scaling.batch_gaps(records[2:]) == []  # no base


def test_last_epoch_loss_and_table(tmp_path):
    """The mean logged training loss over the last epoch, per run and per kind (records written
    before it existed have none)."""
    lines = [{"iteration": i, "total_loss": float(i)} for i in range(8)] + [{"iteration": 7}]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert (
        batch_scaling.last_epoch_loss(batch_scaling.run_metrics(str(tmp_path)), 8, 4) == 6.5
    )  # iterations 6 and 7
    assert (
        batch_scaling.last_epoch_loss(batch_scaling.run_metrics(str(tmp_path / "none")), 8, 4)
        is None
    )
    rec = {"name": "base_s1", "kind": "base", "last_epoch_loss": 6.5}
    records = [rec, dict(rec, name="base_s2", last_epoch_loss=5.5),
               {"name": "recipe_8x_s1", "kind": "recipe_8x"}]  # fmt: skip
    text = batch_scaling.loss_table(records)
    assert text.splitlines()[2:] == ["| base | 6.000 (6.500, 5.500) |"]
    assert batch_scaling.loss_table(records[2:]) == ""


def test_report_draws_the_trend_without_a_noise_run(tmp_path):
    """The trend figure needs only the trend's runs (here with the FrozenBN line): it is written
    (and copied to the docs) when no run measured the noise scale."""

    def rec(kind, batch, ap):
        return {"name": f"{kind}_s1", "kind": kind, "batch": batch, "bn_size": 0,
                "norm": "FrozenBN", "lr": "r", "warmup": False, "warmup_epochs": 0,
                "num_train": 800,
                "updates_per_epoch": 800 // batch, "iterations": 6400 // batch, "train_s": 1.0,
                "wall_s": 2.0, "mmAP": ap, "mmAR": ap, "mmAP_per_epoch": [ap], "exit": 0,
                "seed": 1, "schedule": "normal"}  # fmt: skip

    out, docs = tmp_path / "out", tmp_path / "docs"
    out.mkdir()
    args = batch_scaling.parse_args(["--out-dir", str(out), "--docs-dir", str(docs)])
    records = [rec("base_n800", 4, 50.0), rec("recipe_8x_n800", 32, 20.0)]
    batch_scaling.report(args, records + [rec("frozen_8x_n800", 32, 45.0)], True)
    assert (out / "trend.png").is_file() and (docs / "batch_scaling_trend.png").is_file()
    assert (
        "| 800 | 25 | 200 | 50.0 | 20.0 | -30.0 | -30.0 (1, 1) | 45.0 | -5.0 |"
        in (out / "table.md").read_text()
    )


def test_noise_scale_per_epoch_and_table(tmp_path):
    """B_simple at each evaluation (the last value logged before it), then a table of the
    first and last epoch against the series' batches."""
    lines = [{"iteration": 0, "noise_scale/b_simple": 5.0}, {"iteration": 1, "bbox/AP": 1.0},
             {"iteration": 2, "noise_scale/b_simple": 8.0}, {"iteration": 3},
             {"iteration": 3, "bbox/AP": 2.0}]  # fmt: skip
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert batch_scaling.noise_scale_per_epoch(batch_scaling.run_metrics(str(tmp_path))) == [
        5.0,
        8.0,
    ]
    assert (
        batch_scaling.noise_scale_per_epoch(batch_scaling.run_metrics(str(tmp_path / "none"))) == []
    )
    records = [{"name": "base_noise_s1", "batch": 4, "b_simple_per_epoch": [5.0, 8.0]},
               {"name": "recipe_8x_s1", "batch": 32, "b_simple_per_epoch": []}]  # fmt: skip
    text = batch_scaling.noise_table(records).splitlines()
    assert (
        text[0] == "| run | epoch | B_simple (images) | batch 4 / B_simple | batch 32 / B_simple |"
    )
    assert text[2:] == [
        "| base_noise_s1 | 1 | 5 | 0.8 | 6.4 |",
        "| base_noise_s1 | 2 | 8 | 0.5 | 4 |",
    ]
    assert batch_scaling.noise_table(records[1:]) == ""

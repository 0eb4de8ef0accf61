"""experiments/bn_size_trend.py: argument handling and the commands it would run (no training)."""

import json

import pytest

from tests.utils.scripts import load_script

bn_size_trend = load_script("experiments/bn_size_trend.py")


def test_dry_run_commands():
    cmds = bn_size_trend.main(["--dry-run", "--iters", "100", "--out-dir", "o", "SEED", "1"])
    assert list(cmds) == ["frozenbn", "bn", "cgbn"]
    for variant, norm in (("frozenbn", "FrozenBN"), ("bn", "BN"), ("cgbn", "CGBN")):
        cmd = cmds[variant]
        assert cmd[cmd.index("MODEL.RESNETS.NORM") + 1] == norm
        assert cmd[cmd.index("SOLVER.MAX_ITER") + 1] == "100"
        assert cmd[cmd.index("SOLVER.STEPS") + 1] == "(75,)"
        assert cmd[cmd.index("OUTPUT_DIR") + 1].endswith(f"o/{variant}")
        assert cmd[cmd.index("--num-gpus") + 1] == "2" and cmd[-2:] == ["SEED", "1"]
    assert cmds["frozenbn"][cmds["frozenbn"].index("MODEL.FPN.NORM") + 1] == ""


@pytest.mark.parametrize("argv", [["--variants", "gn"], ["--iters", "2"], ["--eval-period", "0"]])
def test_bad_arguments(argv):
    with pytest.raises(SystemExit):
        bn_size_trend.parse_args(argv)


def test_final_ap(tmp_path):
    assert bn_size_trend.final_ap(str(tmp_path)) is None  # failed before writing metrics
    lines = [{"iteration": 9, "bbox/AP": 1.5}, {"iteration": 10}, {"iteration": 19, "bbox/AP": 2.5}]
    (tmp_path / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert bn_size_trend.final_ap(str(tmp_path)) == 2.5


batch_scaling = load_script("experiments/batch_scaling.py")


def test_batch_scaling_commands():
    cmds = batch_scaling.main(["--dry-run", "--out-dir", "o"])
    assert list(cmds) == list(batch_scaling.VARIANTS)

    def value(variant, key):
        cmd = cmds[variant]
        return cmd[len(cmd) - 1 - cmd[::-1].index(key) + 1]  # the last occurrence wins

    for variant, batch, warmup, reference, norm in [
        ("b4", "4", "64", "4", "CGBN"), ("b32", "32", "8", "4", "CGBN"),
        ("b32_nowarmup", "32", "0", "4", "CGBN"), ("b32_noscale", "32", "8", "32", "CGBN"),
        ("b32_bn", "32", "8", "4", "BN"),
    ]:  # fmt: skip
        assert value(variant, "SOLVER.IMS_PER_BATCH") == batch
        assert value(variant, "SOLVER.WARMUP_ITERS") == warmup  # one epoch of 256 images
        assert value(variant, "SOLVER.MEGDET.REFERENCE_BATCH_SIZE") == reference
        assert value(variant, "MODEL.RESNETS.NORM") == norm
        assert value(variant, "SOLVER.MEGDET.SCHEDULE") == "normal"
        assert value(variant, "SOLVER.MEGDET.EPOCHS") == "8"
    assert value("b4_seed2", "SEED") == "7"


def test_batch_scaling_smoke(tmp_path):
    """Two tiny runs end to end: real train_net.py (2 processes), evaluation every epoch,
    the table and the figures."""
    out = tmp_path / "bs"
    results = batch_scaling.main(["--variants", "b4", "b16", "--epochs", "6", "--num-train",
                                  "16", "--num-val", "8", "--out-dir", str(out)])  # fmt: skip
    for variant, iterations in (("b4", 24), ("b16", 6)):
        summary, _, rc = results[variant]
        assert rc == 0, (out / variant / "train.log").read_text()[-3000:]
        assert summary["iterations"] == iterations and len(summary["ap"]) == 6, summary
    table = (out / "table.md").read_text().splitlines()
    assert len(table) == 4 and table[2].startswith("| b4 | 4 | 4 | r | 24 |"), table
    assert (out / "curves.png").stat().st_size > 10_000

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

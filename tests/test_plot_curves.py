"""Figures 1 / 4: the series read from metrics.json are the ones plotted."""

import json
import math

import pytest

from tests.utils.scripts import load_script

_plot_curves = load_script("tools/plot_curves.py")
extract_series, main, plot_curves = (
    _plot_curves.extract_series,
    _plot_curves.main,
    _plot_curves.plot_curves,
)


def _write_run(path, records, ipe=10, steps=(20, 25)):
    path.mkdir()
    solver = {"IMS_PER_BATCH": 16, "STEPS": list(steps), "MEGDET": {"ITERS_PER_EPOCH": ipe}}
    (path / "config.yaml").write_text(json.dumps({"SOLVER": solver}))  # JSON is YAML
    with open(path / "metrics.json", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


RECORDS = [
    {"iteration": 19, "time": 36.0, "loss": 1.0},  # iterations 0-19: 20 x 36 s = 0.2 h
    {"iteration": 9, "time": 36.0},  # out of order: sorted by iteration
    {"iteration": 19, "bbox/AP": 10.0, "bbox/AR": 20.0},  # evaluation after epoch 2
    {"iteration": 29, "time": 72.0},  # iterations 20-29: 10 x 72 s = 0.2 h
    {"iteration": 29, "bbox/AP": 15.0},
]


def test_series_and_plotted_lines_equal_the_metrics(tmp_path):
    _write_run(tmp_path / "b16", RECORDS)
    b256 = [{"iteration": 4, "time": 720.0}, {"iteration": 4, "bbox/AP": 3.0}]
    _write_run(tmp_path / "b256", b256, ipe=5, steps=[])
    s16 = extract_series(str(tmp_path / "b16"))
    assert s16["ap"] == [10.0, 15.0] and s16["iterations"] == [19, 29]
    # 10 x 36 s (its 0-9) + 10 x 36 s (10-19) = 0.2 h; + 10 x 72 s = 0.4 h
    assert s16["hours"] == pytest.approx([0.2, 0.4])
    assert s16["epochs"] == [2.0, 3.0] and s16["decay_epochs"] == [2.0, 2.5]
    s256 = extract_series(str(tmp_path / "b256"), label="256")
    assert s256["hours"] == pytest.approx([1.0]) and s256["epochs"] == [1.0]

    out = tmp_path / "docs" / "curves.png"
    ax_h, ax_e = plot_curves([s16, s256], str(out))
    assert out.stat().st_size > 1000
    assert [list(line.get_xdata()) for line in ax_h.get_lines()] == [s16["hours"], s256["hours"]]
    assert [list(line.get_ydata()) for line in ax_h.get_lines()] == [[10.0, 15.0], [3.0]]
    curves = [
        line for line in ax_e.get_lines() if len(line.get_xdata()) != 2 or line.get_marker() == "o"
    ]
    assert [list(line.get_xdata()) for line in curves] == [[2.0, 3.0], [1.0]]
    decays = sorted(
        line.get_xdata()[0] for line in ax_e.get_lines() if line.get_linestyle() == "--"
    )
    assert decays == [2.0, 2.5]  # Figure 4's dashed LR-decay markers
    assert [t.get_text() for t in ax_e.get_legend().get_texts()] == ["b16", "256"]


def test_cli_errors_and_fallback(tmp_path, capsys):
    _write_run(tmp_path / "run", RECORDS, ipe=0)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "run"), "--out", str(tmp_path / "x.png")])
    assert "--iters-per-epoch" in capsys.readouterr().err
    ax_h, ax_e = main(
        [str(tmp_path / "run"), "--iters-per-epoch", "5", "--out", str(tmp_path / "x.png")]
    )
    assert list(ax_e.get_lines()[0].get_xdata()) == [4.0, 6.0]
    with pytest.raises(SystemExit):
        main([str(tmp_path / "run"), "--labels", "a", "b", "--iters-per-epoch", "5"])


def test_resumed_run_plots_each_evaluation_once(tmp_path):
    """Killed after evaluating at 29 (but before the checkpoint at 29 was kept), resumed from
    19: the iterations 20-29 and their evaluation are logged twice; the resumed ones count."""
    killed = RECORDS + [{"iteration": 29, "time": 999.0}, {"iteration": 29, "bbox/AP": 99.0}]
    _write_run(tmp_path / "run", killed + RECORDS[3:])
    series = extract_series(str(tmp_path / "run"))
    assert series["ap"] == [10.0, 15.0] and series["iterations"] == [19, 29]
    assert series["hours"] == pytest.approx([0.2, 0.4])


def test_noise_scale_panel_when_a_run_measured_it(tmp_path):
    noise = [{"iteration": 9, "noise_scale/b_simple": 40.0, "noise_scale/S": 8.0},
             {"iteration": 19, "noise_scale/b_simple": None},  # |G|² estimate not positive
             {"iteration": 29, "noise_scale/b_simple": 80.0}]  # fmt: skip
    _write_run(tmp_path / "b16", RECORDS + noise)
    _write_run(tmp_path / "old", RECORDS)  # measured nothing: no B_simple curve
    s16 = extract_series(str(tmp_path / "b16"))
    assert s16["b_simple_epochs"] == [1.0, 2.0, 3.0] and s16["batch"] == 16
    assert s16["b_simple"][0] == 40.0 and math.isnan(s16["b_simple"][1])
    axes = main([str(tmp_path / "b16"), str(tmp_path / "old"), "--out", str(tmp_path / "x.png")])
    assert len(axes) == 3
    (curve,) = [line for line in axes[2].get_lines() if line.get_marker() == "."]
    assert list(curve.get_xdata()) == [1.0, 2.0, 3.0] and curve.get_ydata()[2] == 80.0
    (batch,) = [line for line in axes[2].get_lines() if line.get_linestyle() == ":"]
    assert list(batch.get_ydata()) == [16, 16]  # the mini-batch, dotted
    assert len(main([str(tmp_path / "old"), "--out", str(tmp_path / "y.png")])) == 2

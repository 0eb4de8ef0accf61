"""Table 1: the sample-statistics hook sums over the mini-batch (2 gloo processes); the table."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from detectron2.engine import SimpleTrainer
from detectron2.utils.events import get_event_storage

from megdet_d2.engine.hooks import SampleStatsHook
from megdet_d2.utils import read_metrics
from tests.utils.dist import run_distributed
from tests.utils.scripts import load_script

sample_stats_table = load_script("tools/sample_stats_table.py")

IMAGES = 3  # per process


def _counts(rank, it):
    """Per-image sampler counts of a rank at an iteration: (fg, bg, pos anchors, neg anchors)."""
    g = torch.Generator().manual_seed(100 * rank + it)
    fg = torch.randint(0, 128, (IMAGES,), generator=g)
    pos = torch.randint(0, 64, (IMAGES,), generator=g)
    return fg, 512 - fg, pos, 256 - pos


class _Detector(nn.Module):
    """Puts what detectron2's ROI heads and RPN put (means over this process's images)."""

    def __init__(self, rank):
        super().__init__()
        self.rank, self.w = rank, nn.Parameter(torch.ones(1))

    def forward(self, batch):
        storage = get_event_storage()
        fg, bg, pos, neg = _counts(self.rank, storage.iter)
        storage.put_scalar("roi_head/num_fg_samples", np.mean(fg.tolist()))
        storage.put_scalar("roi_head/num_bg_samples", np.mean(bg.tolist()))
        if storage.iter == 0:  # no RPN at iteration 1: its keys must not be re-summed stale
            storage.put_scalar("rpn/num_pos_anchors", pos.sum().item() / IMAGES)
            storage.put_scalar("rpn/num_neg_anchors", neg.sum().item() / IMAGES)
        return {"loss": (self.w * batch).sum()}


def _train_two_iterations(rank, world_size):
    model = _Detector(rank)
    data = iter([torch.ones(1)] * 2)
    trainer = SimpleTrainer(model, data, torch.optim.SGD(model.parameters(), lr=0.1))
    trainer.register_hooks([SampleStatsHook(IMAGES)])
    trainer.train(0, 2)
    hist = trainer.storage.histories()
    # history: [(value, iteration), ...] -> {iteration: value}
    return {k: {i: x for x, i in v.values()} for k, v in hist.items() if k.startswith("sample_")}


def test_hook_sums_whole_minibatch_over_processes():
    results = run_distributed(_train_two_iterations, world_size=2, timeout=90)
    assert results[0] == results[1]  # every process records the same mini-batch sums
    got = results[0]
    for it in (0, 1):
        fg, bg, pos, neg = (sum(c[i].sum().item() for c in (_counts(0, it), _counts(1, it)))
                            for i in range(4))  # fmt: skip
        assert got["sample_stats/roi_num_pos"][it] == pytest.approx(fg, abs=1e-6)
        assert got["sample_stats/roi_num_neg"][it] == pytest.approx(bg, abs=1e-6)
        assert got["sample_stats/roi_pos_neg_ratio"][it] == pytest.approx(fg / bg)
        assert fg != IMAGES * _counts(0, it)[0].float().mean().item()  # not rank 0's alone
        if it == 0:
            assert got["sample_stats/rpn_num_pos"][0] == pytest.approx(pos, abs=1e-6)
            assert got["sample_stats/rpn_num_neg"][0] == pytest.approx(neg, abs=1e-6)
    assert list(got["sample_stats/rpn_num_pos"]) == [0]  # not re-summed stale at iteration 1


def _write_run(path, batch, ipe, records, preset=True):
    path.mkdir()
    solver = {"IMS_PER_BATCH": batch, "MEGDET": {"ITERS_PER_EPOCH": ipe if preset else 0}}
    (path / "config.yaml").write_text(json.dumps({"SOLVER": solver}))  # JSON is YAML
    with open(path / "metrics.json", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _rec(it, pos, neg):
    return {"iteration": it, "sample_stats/roi_num_pos": pos, "sample_stats/roi_num_neg": neg,
            "sample_stats/rpn_num_pos": 1, "sample_stats/rpn_num_neg": 4}  # fmt: skip


def test_table_from_metrics_files(tmp_path, capsys):
    # run a: 10 iterations per epoch; epoch 1 = its 0-9, epoch 2 = 10-19; a line without stats
    a = [_rec(0, 10, 90), _rec(9, 30, 170), {"iteration": 5, "bbox/AP": 1.0}, _rec(10, 50, 150)]
    _write_run(tmp_path / "a", 16, 10, a)
    # run b: no preset -> --iters-per-epoch 5; epoch 2 has no records
    _write_run(tmp_path / "b", 256, 0, [_rec(1, 1, 9)], preset=False)
    with pytest.raises(SystemExit):  # b needs --iters-per-epoch
        sample_stats_table.main([str(tmp_path / "a"), str(tmp_path / "b")])
    assert "--iters-per-epoch" in capsys.readouterr().err
    lines = sample_stats_table.main(
        [str(tmp_path / "a"), str(tmp_path / "b"), "--epochs", "1", "2", "--iters-per-epoch", "5"]
    )
    assert lines[0] == "| Epoch | a (batch 16) | b (batch 256) |"
    assert lines[2] == "| 1 | 15.38 | 11.11 |"  # (10 + 30) / (90 + 170); 1 / 9
    assert lines[3] == "| 2 | 33.33 | – |"  # 50 / 150
    rpn = sample_stats_table.main([str(tmp_path / "a"), "--epochs", "1", "--kind", "rpn"])
    assert rpn[2] == "| 1 | 25.00 |"


def test_resumed_run_counts_each_iteration_once(tmp_path):
    """A run killed after logging iterations 0-11 and resumed from its checkpoint at 9 logs
    iterations 10 and 11 again; the resumed values count, once."""
    killed = [_rec(0, 10, 90), _rec(9, 30, 170), _rec(10, 999, 1), _rec(11, 999, 1)]
    resumed = [_rec(10, 50, 150), _rec(11, 20, 80), {"iteration": 11, "bbox/AP": 7.0}]
    _write_run(tmp_path / "run", 16, 10, killed + resumed)
    records = read_metrics(str(tmp_path / "run"))
    assert [r["iteration"] for r in records] == [0, 9, 10, 11]
    assert records[-1]["sample_stats/roi_num_pos"] == 20 and records[-1]["bbox/AP"] == 7.0
    lines = sample_stats_table.main([str(tmp_path / "run"), "--epochs", "1", "2"])
    assert lines[2] == "| 1 | 15.38 |"
    assert lines[3] == "| 2 | 30.43 |"  # (50 + 20) / (150 + 80), not the killed run's

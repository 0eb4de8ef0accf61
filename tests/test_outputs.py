"""metrics.json: strict JSON (null for a non-finite value) and, after a resume, each iteration
once (the records an interrupted run logged past its checkpoint are dropped, not repeated)."""

import json

from detectron2.utils.events import EventStorage

from megdet_d2.engine.trainer import MegDetJSONWriter


def _reject_nan(name):
    raise ValueError(f"{name} is not JSON")


def _read(path):
    with open(path) as f:
        return [json.loads(line, parse_constant=_reject_nan) for line in f]


def test_non_finite_values_are_null(tmp_path):
    path = tmp_path / "metrics.json"
    writer = MegDetJSONWriter(str(path))
    with EventStorage(start_iter=7) as storage:
        storage.put_scalar("bbox/AP", float("nan"), smoothing_hint=False)
        storage.put_scalar("bbox/AP50", float("inf"), smoothing_hint=False)
        storage.put_scalar("total_loss", 1.5, smoothing_hint=False)
        writer.write()
    writer.close()
    assert _read(path) == [{"bbox/AP": None, "bbox/AP50": None, "iteration": 7, "total_loss": 1.5}]


def test_drop_from_keeps_earlier_iterations_and_removes_a_cut_line(tmp_path):
    path = tmp_path / "metrics.json"
    lines = [json.dumps({"iteration": i, "lr": 0.1 * i}) for i in range(6)]
    path.write_text("\n".join(lines) + '\n{"iteration": 6, "l')  # killed while writing 6
    writer = MegDetJSONWriter(str(path))
    assert writer.drop_from(3) == 4  # 3, 4, 5 and the cut line
    with EventStorage(start_iter=3) as storage:  # the resumed run logs 3 again
        storage.put_scalar("lr", 9.0, smoothing_hint=False)
        writer.write()
    writer.close()
    records = _read(path)
    assert [r["iteration"] for r in records] == [0, 1, 2, 3]
    assert records[-1]["lr"] == 9.0
    assert not list(tmp_path.glob(".*.tmp"))  # rewritten atomically, nothing left behind

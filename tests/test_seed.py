"""``SEED -1`` becomes one concrete seed per run, reused by ``--resume`` (so resuming the paper
configs, which inherit -1, stays exact; the end-to-end check is tests/test_resume_exact.py)."""

from detectron2.config import get_cfg

from megdet_d2 import add_megdet_config
from megdet_d2.engine.seed import resolve_run_seed


def _cfg(tmp_path, seed):
    cfg = add_megdet_config(get_cfg())
    cfg.SEED, cfg.OUTPUT_DIR = seed, str(tmp_path)
    cfg.freeze()
    return cfg


def test_explicit_seed_is_kept(tmp_path):
    cfg = _cfg(tmp_path, 5)
    assert resolve_run_seed(cfg, resume=False) == 5 == cfg.SEED


def test_random_seed_is_drawn_once_and_recorded_seed_reused(tmp_path):
    first, second = _cfg(tmp_path, -1), _cfg(tmp_path, -1)
    a, b = resolve_run_seed(first, resume=False), resolve_run_seed(second, resume=False)
    assert a >= 0 and b >= 0 and a != b  # new runs: new seeds (2^31 values)
    assert first.SEED == a and first.is_frozen()
    (tmp_path / "config.yaml").write_text("SEED: 1234\n")  # what the interrupted run recorded
    assert resolve_run_seed(_cfg(tmp_path, -1), resume=True) == 1234
    assert resolve_run_seed(_cfg(tmp_path, -1), resume=False) != 1234
    (tmp_path / "config.yaml").write_text("SEED: -1\n")  # recorded by an older version
    assert resolve_run_seed(_cfg(tmp_path, -1), resume=True) >= 0

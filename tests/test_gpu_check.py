"""The GPU check's code, run on CPU in CI, so that a lent GPU's minutes are not lost to a bug.

* ``benchmarks/bench_cgbn_cuda.py``: its measurement and table code, on the CPU stand-ins of the
  CUDA kernels (torch's ``SyncBatchNorm`` Function on them, CGBN's CUDA half on them);
* ``scripts/gpu_check.sh``: the whole script on this machine, where its CUDA steps skip.
"""

import os
import subprocess
import sys
import types

import pytest
import torch
import torch.distributed as dist

from benchmarks import bench_cgbn_cuda as bench
from megdet_d2.layers import cgbn_cuda
from tests.utils import cuda_kernels as K
from tests.utils.dist import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench_rows(rank, world_size):
    K.patch_torch_kernels()  # for SyncBatchNorm's Function, in this spawned process only
    calls = {"gather": 0}

    def gather(*args, **kwargs):
        calls["gather"] += 1
        return K.EMULATED_NCCL.all_gather_into_tensor(*args, **kwargs)

    kernels = types.SimpleNamespace(**{**vars(K.EMULATED_NCCL), "all_gather_into_tensor": gather})
    rows = []
    with cgbn_cuda.use_kernels(kernels):
        for precision, dtype in (("fp32", torch.float32), ("AMP fp16", torch.float16)):
            result = bench.measure(8, 6, 5, dtype, dist.group.WORLD, 2, 4, device="cpu")
            rows.append((result, bench.table_row("tiny", 8, 6, 5, precision, result)))
    return rows, calls["gather"]


def test_bench_cgbn_cuda_measures_on_standins():
    rows, cgbn_gathers = run_distributed(_bench_rows, world_size=1)[0]
    # per dtype: 3 warm-up calls, 4 rounds x 2 calls; all through CGBN's CUDA half
    assert cgbn_gathers == 2 * (3 + 4 * 2)
    for result, row in rows:
        assert set(result["ms"]) == {"CGBN", "SyncBN", "BN"}
        assert all(ms > 0 for ms in result["ms"].values())
        assert len(result["ratios"]) == 4 and all(r > 0 for r in result["ratios"])
        assert result["syncs"] == {"CGBN": None, "SyncBN": None, "BN": None}  # CUDA only
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == 9 and cells[1] == "8 x 6 x 5" and cells[-1] == "n/a, n/a"
    assert rows[1][1].split("|")[3].strip() == "AMP fp16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, run scripts/gpu_check.sh")
def test_gpu_check_script_without_gpu(tmp_path):
    out = tmp_path / "report"
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        GPU_CHECK_TESTS="tests/test_cuda_emulation.py::test_empty_rows_weigh_nothing_in_the_gather",
    )
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", str(out)], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "GPU: none (CUDA steps skip)" in report
    assert "| quickstart | skipped: no GPU | 0 |" in report
    assert "No GPU: nothing to measure." in (out / "bench_cgbn_cuda.log").read_text()
    for step in ("pytest", "bench_cgbn_cuda", "bench_sublinear"):
        assert f"| {step} | ok |" in report, report
    assert "2 passed" in report  # the selection's result is in the report
    assert sorted(p.name for p in out.iterdir()) == [
        "bench_cgbn_cuda.log", "bench_sublinear.log", "env.txt", "pytest.log", "report.md",
    ]  # fmt: skip

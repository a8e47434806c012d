"""benchmarks/gpu_check.sh, the CUDA check the project ships: syntax, its argument checks, loud failure where no GPU
is present, and a CPU dry run of its pipeline steps (GPU_CHECK_DEVICE=cpu, tiny budgets)."""
import importlib.util
import os
import subprocess

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.sh")


def _run(out, timeout=900, **env):
    return subprocess.run(["bash", SCRIPT, str(out)], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def test_syntax_and_usage_header():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0
    header = open(SCRIPT).read().split("set -euo pipefail")[0]
    assert "bash benchmarks/gpu_check.sh [OUT_DIR]" in header and 'pip install -e ".[dev]"' in header


def test_unknown_device_is_refused(tmp_path):
    proc = _run(tmp_path, timeout=60, GPU_CHECK_DEVICE="tpu")
    assert proc.returncode == 2 and "GPU_CHECK_DEVICE" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure on a machine without CUDA")
def test_fails_loudly_without_cuda(tmp_path):
    proc = _run(tmp_path, timeout=120, GPU_CHECK_DEVICE="cuda")
    log = (tmp_path / "gpu_check.log").read_text()
    assert proc.returncode != 0 and "torch.cuda.is_available() is False" in log and "gpu_check: FAILED" in log


@pytest.mark.slow
def test_cpu_dry_run_of_every_step(tmp_path):
    """Steps 1, 3 and 5 on the CPU; step 5 (TensorRT) forced, so without TensorRT it must say how to install it."""
    no_trt = importlib.util.find_spec("tensorrt") is None
    proc = _run(tmp_path, GPU_CHECK_DEVICE="cpu", GPU_CHECK_METHODS="mpqdm", GPU_CHECK_PYTEST="0",
                GPU_CHECK_TRT="1" if no_trt else "0")
    log = (tmp_path / "gpu_check.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    measured = (tmp_path / "measure.txt").read_text().splitlines()
    scripts = [line.split(":")[0].split("/")[-1] for line in measured]
    assert scripts == ["01_collect_input_4_calib.py", "02_quantize_ldm_naive.py", "03_train_mpqdm.py",
                       "04_sample_lora_model.py", "05_evaluate.py", "06_export_packed.py", "04_sample_lora_model.py"]
    assert all("exit 0, wall" in line and "peak RSS" in line for line in measured)
    run = tmp_path / "digits-mpqdm"
    for name in ("samples.npz", "samples.metrics.json", "export.safetensors", "packed.npz"):
        assert (run / name).is_file(), name
    assert "gpu_check: OK" in log and "=== summary" in log
    assert "=== 5. TensorRT INT8 engine" in log
    assert ('skipped: TensorRT is not installed (pip install -e ".[tensorrt]")' if no_trt else
            "skipped (runs on CUDA only") in log


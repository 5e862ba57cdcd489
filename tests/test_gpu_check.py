"""bench/gpu_check.py --smoke: the GPU check's code runs end to end on the CPU with tiny shapes, so the first
real GPU run does not die on a typo. It measures nothing here."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_smoke(tmp_path):
    out = tmp_path / "report.md"
    run = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = out.read_text()
    for part in ("tests", "kernels", "rollout", "step", "shared", "qwen3"):
        assert f"## {part}: ok" in report, report
    assert "error:" not in report, report                     # no kernel row failed
    assert report.count("2/2 sequences identical to transformers") == 2, report  # Llama's and Qwen3's rollouts
    assert "qwen3, h 64" in report, report
    assert "| time_update_s |" in report and "missing" not in report, report

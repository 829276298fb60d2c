"""bench/gpu_check.py --smoke: the one-shot GPU check runs end to end on whatever device is here
(CI: the CPU, its Triton kernels interpreted), so the script a GPU session runs once cannot rot."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_every_section_at_toy_size(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--out", str(tmp_path),
                           "--budget", "600"], capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(data["sections"]) == ["environment", "kernels", "engine", "steps", "profile", "training"]
    for name, rows in data["sections"].items():
        assert not (isinstance(rows, dict) and ("failed" in rows or "skipped" in rows)), (name, rows)
    md = (tmp_path / "gpu_check.md").read_text()
    assert "FAILED" not in md and "bit-identical" in md
    steps = data["sections"]["steps"]
    assert {r["mode"] for r in steps} >= {"eager", "compiled"} and all("step_ms" in r for r in steps)
    training = data["sections"]["training"]
    assert [r["compiled"] for r in training] == [False, True]
    assert all(r["tokens_s"] > 0 and 0 < r["mfu"] < 1 for r in training)

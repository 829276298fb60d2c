"""The Triton ops traced by inductor (no GPU needed): the compiled step keeps both kernels in one
graph, inductor's mutation analysis of them succeeds, and the table is never copied (a clone of a
100–200 MB table every step is what a wrongly inferred mutation would cost)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import csrc_triton as ct

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not ct.HAS_TRITON, reason="triton is not installed")


@pytest.mark.parametrize("kind,kernels", [("tail", 3), ("front", 2)])  # update + commit + merge; commit + merge
def test_the_compiled_step_traces_the_triton_kernels_without_copying_the_table(kind, kernels):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "inductor_trace.py"), kind],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["error"] is None, report["error"]
    assert report["graphs"] == 1  # fullgraph: one graph, traced to inductor's post-grad passes
    assert report["table_inputs"] in (1, 2)  # the commit table argument, and the model's own parameter
    assert len(report["kernels"]) == kernels
    assert any(k["reads_table_as"] == ["e_ptr"] for k in report["kernels"])  # the commit reads the table …
    assert report["table_copies"] == []  # … in place: never cloned, never copied (inductor knew what each kernel writes)

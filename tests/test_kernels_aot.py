"""GPU-compiler regression: every kernel variant the launchers can pick compiles for sm_80 and
sm_90 with zero register spills and shared memory within the chip limit — no GPU needed.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` produces PTX/cubin on any
machine; register and spill counts come from re-assembling the PTX with Triton's bundled ptxas
(`-v`), see csrc_triton/_aot.py. Under TRITON_INTERPRET=1 (how the other kernel tests run on
CPU) `@triton.jit` yields interpreter objects that cannot be compiled, so the compiles run in
one subprocess with TRITON_INTERPRET removed from its environment.

Variants are compiled both with the 16-byte alignment specialisation a launch gets for
aligned pointers / multiple-of-16 strides (d = 768, 1024, ...) and without it (d = 100, odd
strides), because unaligned code holds per-element addresses and needs more registers.
CI compiles a representative subset (the heaviest flag set of every config; see `ci` in each
op's aot_variants); `pytest -m slow tests/test_kernels_aot.py` compiles all of them.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile

import pytest

import csrc_triton as ct

aot = importlib.import_module("csrc_triton._aot")
pytestmark = pytest.mark.skipif(not ct.HAS_TRITON, reason="triton is not installed")

VARIANTS = aot.all_variants() if ct.HAS_TRITON else []
ARCHS = (80, 90)
PARAMS = [
    pytest.param(v["name"], arch, aligned, marks=[] if v["ci"] else [pytest.mark.slow],
                 id=f"{v['name']}-sm{arch}-{'aligned' if aligned else 'unaligned'}")
    for v in VARIANTS for arch in ARCHS for aligned in (True, False)
]


@pytest.fixture(scope="session")
def aot_results(request):
    """Compile, in one subprocess, exactly the variants selected in this session."""
    wanted = {item.callspec.params["name"] for item in request.session.items
              if item.originalname == "test_variant_compiles_clean" and hasattr(item, "callspec")}
    with tempfile.TemporaryDirectory() as tmp:
        names = os.path.join(tmp, "names.json")
        with open(names, "w") as f:
            json.dump(sorted(wanted), f)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        proc = subprocess.run(
            [sys.executable, "-m", "csrc_triton._aot", "--names", names, "--align", "both",
             "--arch", *map(str, ARCHS)],
            capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(aot.__file__)), timeout=1800,
        )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            out[(r["name"], r["arch"], r["aligned"])] = r
    return out


@pytest.mark.parametrize("name,arch,aligned", PARAMS)
def test_variant_compiles_clean(aot_results, name, arch, aligned):
    r = aot_results.get((name, arch, aligned))
    assert r is not None, "variant was not compiled"
    assert r["error"] is None, r["error"]
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"register spills: {r}"
    assert r["shared"] <= aot.SHARED_LIMIT[arch], f"shared memory {r['shared']} B > limit: {r}"
    assert r["regs"] * 32 * r["num_warps"] <= aot.REG_FILE, f"block does not fit the register file: {r}"


def test_variant_list_covers_every_launcher_choice():
    """The AOT list is derived from the same tables the launchers pick from: check they agree."""
    nn = importlib.import_module("csrc_triton.nn_commit")
    mu = importlib.import_module("csrc_triton.maturation_update")
    import torch

    compiled = {(v["constexprs"]["BLOCK_N"], v["constexprs"]["BLOCK_V"], v["constexprs"]["BLOCK_D"],
                 v["options"]["num_warps"], v["options"]["num_stages"], v["constexprs"]["NATIVE_DOT"],
                 v["constexprs"]["GEMV"], v["signature"]["q_ptr"], v["signature"]["e_ptr"])
                for v in nn.aot_variants() if v["kernel"] == "_nn_commit_kernel"}
    tl_name = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
    for q_dt, e_dt in nn.DTYPE_PAIRS:
        for n in (1, 2, 3, 4, 5, 15, 16, 17, 64, 512, 4096):
            cfg = nn.commit_config(n, q_dt, e_dt)
            path = nn.commit_path(n, q_dt, e_dt)[0]
            # what _launch passes: GEMV below 16 rows (a tensor-core dot needs 16), else the dtype's dot
            assert cfg[0] < 16 if path == "gemv" else cfg[0] >= 16
            assert (*cfg, path == "native", path == "gemv", tl_name[q_dt], tl_name[e_dt]) in compiled
    # and the validation accepts exactly the dtype pairs that are compiled
    for q_dt in tl_name:
        for e_dt in tl_name:
            ok = (q_dt, e_dt) in nn.DTYPE_PAIRS
            q, e = torch.zeros(2, 8, dtype=q_dt), torch.zeros(5, 8, dtype=e_dt)
            if ok:
                nn.validate(q, e, None, None)
            else:
                with pytest.raises(TypeError):
                    nn.validate(q, e, None, None)
    names = {v["name"] for v in VARIANTS}
    assert len(names) == len(VARIANTS)
    assert {mu.update_config(d) for d in (1, 256, 257, 8192)} == set(mu.UPDATE_CONFIGS)

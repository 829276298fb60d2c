"""Ahead-of-time compile of every kernel variant for NVIDIA targets, without a GPU.

    python -m csrc_triton._aot [--arch 80 90] [--align both|aligned|unaligned] [--only SUBSTR] [--ci]

prints one JSON object per line: {"name", "arch", "aligned", "regs", "spill_stores",
"spill_loads", "stack", "shared", "num_warps", "error"}. Used by tests/test_kernels_aot.py.

How the numbers are obtained: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch,
32))`` lowers the kernel to PTX and cubin exactly as a launch would (same options). The
compiled kernel carries ``metadata.shared`` (bytes of shared memory) but, without a driver, no
register/spill counts, so the PTX is re-assembled with Triton's own bundled ``ptxas`` using
the flags Triton uses (``-lineinfo -v --regAllocOptLevel=2 --gpu-name=sm_XX[a]`` and
``--fmad=false`` when fp fusion is off) and its ``-v`` report is parsed.

Must run with TRITON_INTERPRET unset: under the interpreter ``@triton.jit`` yields interpreter
objects that cannot be compiled. The test runs this module in a subprocess for that reason.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

# sm_80: 163 KiB of dynamic shared memory per block; sm_90: 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
REG_FILE = 65536  # 32-bit registers per SM, both archs
ALIGNABLE = re.compile(r"^(D|s_\w+|stride_\w+)$")


def all_variants():
    # (the package re-exports functions under the submodules' names, so import the modules by path)
    mods = [importlib.import_module(f"{__package__}.{m}") for m in ("maturation_update", "nn_commit")]
    return [v for m in mods for v in m.aot_variants()]


def _ptxas_report(ptx: str, arch: int, options: dict) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        fmad = [] if options.get("enable_fp_fusion", True) else ["--fmad=false"]
        cmd = [ptxas, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(tmp, "k.o")]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    if not (regs and spills and stack):
        raise RuntimeError(f"could not parse ptxas -v output:\n{log}")
    return {"regs": int(regs.group(1)), "spill_stores": int(spills.group(1)),
            "spill_loads": int(spills.group(2)), "stack": int(stack.group(1))}


def compile_variant(v: dict, arch: int, aligned: bool) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = getattr(importlib.import_module(v["module"]), v["kernel"])
    if not isinstance(fn, JITFunction):
        raise RuntimeError("AOT compile needs TRITON_INTERPRET unset when csrc_triton is imported")
    attrs = {}
    if aligned:  # what a launch specialises for 16-byte aligned pointers and multiple-of-16 ints
        for i, (name, ty) in enumerate(v["signature"].items()):
            if ty.startswith("*") or (ty == "i32" and ALIGNABLE.match(name)):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, v["signature"], v["constexprs"], attrs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(v["options"]))
    rep = _ptxas_report(k.asm["ptx"], arch, v["options"])
    rep.update(name=v["name"], arch=arch, aligned=aligned, shared=int(k.metadata.shared),
               num_warps=v["options"].get("num_warps", 4), error=None)
    return rep


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--align", choices=("both", "aligned", "unaligned"), default="both")
    ap.add_argument("--only", default=None, help="keep variants whose name contains this")
    ap.add_argument("--names", default=None, help="JSON file with a list of variant names to keep")
    ap.add_argument("--ci", action="store_true", help="keep only the variants marked for CI")
    ap.add_argument("--list", action="store_true", help="print variant names and exit")
    args = ap.parse_args(argv)
    variants = [v for v in all_variants() if args.only is None or args.only in v["name"]]
    if args.ci:
        variants = [v for v in variants if v["ci"]]
    if args.names:
        with open(args.names) as f:
            keep = set(json.load(f))
        variants = [v for v in variants if v["name"] in keep]
    if args.list:
        for v in variants:
            print(v["name"])
        return 0
    aligns = {"both": (True, False), "aligned": (True,), "unaligned": (False,)}[args.align]
    for v in variants:
        for arch in args.arch:
            for al in aligns:
                try:
                    rep = compile_variant(v, arch, al)
                except Exception as e:  # report, let the test fail on this entry
                    rep = {"name": v["name"], "arch": arch, "aligned": al,
                           "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                print(json.dumps(rep), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

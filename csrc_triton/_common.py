"""Shared plumbing for the ops: implementation choice, Triton availability, input checks.

Nothing here launches work on a device or reads device memory: every check looks at
shapes, dtypes, devices and strides only, so none of them costs a host sync and all of
them trace under ``torch.compile(fullgraph=True)`` (they are plain Python on static
metadata).
"""
from __future__ import annotations

import os

import torch

IMPLS = ("auto", "triton", "torch")
ENV_VAR = "TMFAST_IMPL"
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

try:  # Triton is optional: the torch path must work without it (e.g. macOS, minimal installs).
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

# The interpreter is chosen by Triton when a kernel is *decorated*, i.e. when this package is
# imported; flipping TRITON_INTERPRET afterwards has no effect on our kernels.
INTERPRET = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"

# Where Triton kernels can run at all: on a GPU, or anywhere under the interpreter. Only there are
# the torch.library ops registered — registering a triton_op imports torch._inductor (~2 s of
# start-up for every CPU-only process, the CLI included). The @triton.jit kernels themselves are
# defined whenever Triton is importable, so the ahead-of-time compile checks work everywhere.
CAN_RUN = HAS_TRITON and (INTERPRET or torch.cuda.is_available())


def resolve_impl(impl: str | None, device: torch.device, op: str) -> str:
    """impl argument > $TMFAST_IMPL > "auto".  Returns "triton" or "torch".

    "auto" picks Triton for CUDA tensors (when Triton is importable) and torch otherwise.
    An explicit "triton" that cannot run raises RuntimeError instead of falling back.
    """
    requested = impl if impl is not None else os.environ.get(ENV_VAR, "auto")
    if requested not in IMPLS:
        raise ValueError(f"{op}: impl={requested!r} is not one of {IMPLS} (from the impl argument or ${ENV_VAR})")
    if requested == "torch":
        return "torch"
    if requested == "auto":
        return "triton" if (HAS_TRITON and device.type == "cuda") else "torch"
    # explicit triton
    if not HAS_TRITON:
        raise RuntimeError(f"{op}: impl='triton' was requested but the triton package is not importable")
    if device.type == "cuda" or INTERPRET:
        return "triton"
    raise RuntimeError(
        f"{op}: impl='triton' was requested for {device.type} tensors; Triton runs on CUDA tensors, "
        "or anywhere under TRITON_INTERPRET=1 set before csrc_triton is imported"
    )


def check_tensor(op, name, t, *, ndim, dtypes, device=None, unit_stride=True):
    """Type/rank/dtype/device/last-dim-stride checks; one-line errors that name the argument.
    unit_stride=False: any layout (a matmul reads it as it is)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have rank {ndim}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} has dtype {str(t.dtype).replace('torch.', '')}; expected one of {names}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the other inputs are on {device}")
    if unit_stride and ndim >= 1 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{op}: {name} must have unit stride in its last dimension (got strides {tuple(t.stride())}); "
            "pass .contiguous()"
        )


def check_rows_nonoverlapping(op, name, t):
    """A (..., d) view written in place must not have overlapping rows (expand(), stride 0, ...).
    Skipped while compiling: sizes may be symbolic there (a sort by them would break the graph),
    and the compiled callers write tensors they made themselves."""
    if is_compiling():
        return
    need = t.shape[-1]
    dims = sorted(((st, s) for s, st in zip(t.shape[:-1], t.stride()[:-1]) if s > 1))
    for stride, size in dims:
        if stride < need:
            raise ValueError(f"{op}: {name} has overlapping rows (strides {tuple(t.stride())}); pass .contiguous()")
        need = stride * size


def is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - very old torch
        return False

"""Shared pytest setup.

Kernel tests (tests/test_kernels_*.py): with no CUDA device the Triton kernels run under the
Triton interpreter. Triton picks the interpreter when a kernel is *decorated*, i.e. when
csrc_triton is imported, so TRITON_INTERPRET=1 must be in the environment before that import;
conftest.py is imported before any test module, which makes a plain `pytest` work.

The kernel tests' shared preamble lives here too (`from conftest import DEV, IMPLS, …`):
where they run, whether Triton can run there, and the impl parametrisation.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import csrc_triton as ct  # noqa: E402  (after TRITON_INTERPRET is set)

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
TRITON_OK = ct.HAS_TRITON and (CUDA or ct.INTERPRET)  # the kernels can run here
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="Triton needs CUDA or TRITON_INTERPRET=1")
IMPLS = ["torch", pytest.param("triton", marks=needs_triton)]


def pytest_configure(config):
    # also declared in pyproject.toml; repeated so the kernel tests' marker is known either way
    config.addinivalue_line("markers", "slow: big cases (V=50257 under the interpreter, full AOT sweep); run with -m ''")

"""Shared pytest setup.

Kernel tests (tests/test_kernels_*.py): with no CUDA device the Triton kernels run under the
Triton interpreter. Triton picks the interpreter when a kernel is *decorated*, i.e. when
csrc_triton is imported, so TRITON_INTERPRET=1 must be in the environment before that import;
conftest.py is imported before any test module, which makes a plain `pytest` work.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # also declared in pyproject.toml; repeated so the kernel tests' marker is known either way
    config.addinivalue_line("markers", "slow: big cases (V=50257 under the interpreter, full AOT sweep); run with -m ''")

"""Test set-up: Triton's interpreter for CPU runs, and the ``gpu`` marker's skip.

TRITON_INTERPRET must be set before any kernel module is imported (Triton reads it when
``@triton.jit`` decorates), so it is set here, at the top, before anything else.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

"""Test configuration: Triton runs under its interpreter when there is no GPU.

TRITON_INTERPRET must be set before any Triton kernel is defined, so it is set here, before
mixkernels is imported by any test module.
"""
import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    # Fresh random inputs per test, reproducible per test id for debugging failures.
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("MIXKERNELS_TEST_SEED", "0")))
    yield

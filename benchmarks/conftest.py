"""pytest-benchmark front end of the mixkernels benchmark suite.

Same cases, inputs, providers and float64 error checks as ``python -m mixkernels.bench``
(``mixkernels.bench.harness.prepare`` / ``instrument``); pytest-benchmark does the timing and
the error metrics go to ``extra_info``. Default: a tiny CPU set. Knobs:
``MIXKERNELS_BENCH_DEVICE=cuda`` and ``MIXKERNELS_BENCH_FULL=1`` (the full shapes).

    PYTHONPATH=. python -m pytest benchmarks -q                    # tiny CPU set
    PYTHONPATH=. python -m pytest benchmarks --benchmark-json=out.json
"""
import itertools
import os

import pytest
import torch

from mixkernels import BackendUnavailable
from mixkernels.bench.cases import build_cases
from mixkernels.bench.harness import Settings, Skip, _dtype_name, instrument, prepare


def _settings() -> Settings:
    dev = torch.device(os.environ.get("MIXKERNELS_BENCH_DEVICE", "cpu"))
    quick = os.environ.get("MIXKERNELS_BENCH_FULL") != "1"
    s = Settings(device=dev, quick=quick)
    if quick and dev.type == "cpu":
        s.skip_compile, s.compile_reason = True, "torch.compile peers skipped in the quick CPU set"
    return s


SETTINGS = _settings()
_PREPARED = {}


def pytest_generate_tests(metafunc):
    if "bench_item" not in metafunc.fixturenames:
        return
    suite = getattr(metafunc.module, "SUITE")
    dtypes = [torch.bfloat16] if SETTINGS.device.type == "cuda" else [torch.float32]
    items, ids = [], []
    for case in build_cases([suite], SETTINGS, dtypes):
        for p in case.providers:
            items.append((case, p))
            ids.append(f"{case.name}-{_dtype_name(case.dtype)}-{case.mode}-{p.name}")
    metafunc.parametrize("bench_item", items, ids=ids)


@pytest.fixture
def run_bench(benchmark):
    def go(item):
        case, provider = item
        if case.key not in _PREPARED:
            try:
                _PREPARED[case.key] = prepare(case, SETTINGS)
            except Skip as e:
                _PREPARED[case.key] = e
        prep = _PREPARED[case.key]
        if isinstance(prep, Skip):
            pytest.skip(str(prep))
        try:
            fn, metrics = instrument(prep, provider)
        except (Skip, BackendUnavailable) as e:
            pytest.skip(str(e))
        benchmark.extra_info.update(metrics, floor_bytes=case.floor_bytes, params=case.params)
        counter = itertools.count()
        cuda = SETTINGS.device.type == "cuda"

        def call():
            fn(next(counter))
            if cuda:
                torch.cuda.synchronize()

        rounds = 5 if SETTINGS.quick else 20
        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
        try:
            med = benchmark.stats.stats.median
            if case.floor_bytes and med > 0:
                benchmark.extra_info["GBps"] = case.floor_bytes / med / 1e9
        except AttributeError:  # benchmarks disabled (--benchmark-disable)
            pass

    return go

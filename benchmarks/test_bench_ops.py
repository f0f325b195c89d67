"""pytest-benchmark: the `ops` suite of `python -m mixkernels.bench` (see conftest.py)."""
SUITE = "ops"


def test_ops(bench_item, run_bench):
    run_bench(bench_item)

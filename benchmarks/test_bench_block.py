"""pytest-benchmark: the `block` suite of `python -m mixkernels.bench` (see conftest.py)."""
SUITE = "block"


def test_block(bench_item, run_bench):
    run_bench(bench_item)

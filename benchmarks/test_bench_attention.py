"""pytest-benchmark: the `attention` suite of `python -m mixkernels.bench` (see conftest.py)."""
SUITE = "attention"


def test_attention(bench_item, run_bench):
    run_bench(bench_item)

"""Training-step benchmarks (pytest-benchmark): fused vs official-style eager model.

Here: a tiny CPU variant so the file runs anywhere
(``PYTHONPATH=. python -m pytest benchmarks/test_bench_model.py --benchmark-only``).
The GPU shapes (MixMIM-B and Swin-B at 224 px, bf16 autocast, eager / compiled, images/s and
peak memory) are run by the bench suite (``python -m mixkernels.bench``) through
:func:`mixkernels.models.make_training_step`; on a CUDA device this file also times MixMIM-B.
"""
import pytest
import torch

from mixkernels.models import make_training_step

CPU_CASES = [("mixmim_tiny", 8), ("ummae_swin_tiny_test", 8)]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager_reference"])
@pytest.mark.parametrize("name,batch", CPU_CASES)
def test_bench_train_step_cpu(benchmark, name, batch, fused):
    step = make_training_step(name, fused=fused, compile=False, batch=batch, device="cpu", dtype=None)
    step()  # warm-up
    loss = benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(images_per_step=batch, fused=fused, model=name)
    if benchmark.stats is not None:  # None with --benchmark-disable
        benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.median
    assert torch.isfinite(loss)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager_reference"])
def test_bench_mixmim_base_step_gpu(benchmark, fused):
    torch.cuda.reset_peak_memory_stats()
    step = make_training_step("mixmim_base", fused=fused, compile=False, batch=64, device="cuda",
                              dtype=torch.bfloat16)

    def run():
        loss = step()
        torch.cuda.synchronize()
        return loss

    run()
    loss = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    if benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = 64 / benchmark.stats.stats.median
    assert torch.isfinite(loss)

"""CPU benchmark of the fused reconstruction losses vs the eager reference (pytest-benchmark).

    PYTHONPATH=. python -m pytest benchmarks/test_bench_losses.py -s --benchmark-columns=median,rounds \
        --benchmark-sort=name      (add --benchmark-json=FILE to keep the numbers, GB/s in extra_info)

Shapes are CPU-sized versions of the real ones: MixMIM (B=16, 224 px, p=32 targets, batch-shared
mask 0.5) and UM-MAE (B=16, 256 px, p=16, compact pred of the 75% removed patches). Effective
GB/s counts the bytes a fused kernel must move (image, the pred rows a loss reads, the output;
backward adds the incoming gradient and every dpred element), the same count for both columns.
No timing assertions; GPU numbers come from the suite in mixkernels.bench on a lent GPU.
"""
from __future__ import annotations

import pytest
import torch

import mixkernels as mk
from mixkernels import reference as ref

pytest.importorskip("pytest_benchmark")


def _mixmim_inputs(dtype=torch.float32):
    B, S, p = 16, 224, 32
    L = (S // p) ** 2
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2 * B, L, p * p * 3, generator=g).to(dtype)
    imgs = torch.rand(B, 3, S, S, generator=g)
    mask = torch.zeros(L, dtype=torch.bool)
    mask[torch.randperm(L, generator=g)[: L // 2]] = True
    return pred, imgs, mask, p


def _ummae_inputs(dtype=torch.float32):
    B, S, p = 16, 256, 16
    L = (S // p) ** 2
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[:, ::4] = False  # 75% removed, the same count per image
    pred = torch.randn(B, int(mask[0].sum()), p * p * 3, generator=g).to(dtype)
    imgs = torch.rand(B, 3, S, S, generator=g)
    return pred, imgs, mask, p


def _bytes(pred, imgs, rows_read, backward):
    D, es = pred.shape[-1], pred.element_size()
    n = imgs.numel() * imgs.element_size() + rows_read * D * es + rows_read * 4  # image, pred rows, loss
    if backward:
        n += imgs.numel() * imgs.element_size() + rows_read * D * es + rows_read * 4 + pred.numel() * es
    return n


def _run(benchmark, fn, nbytes):
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info["GB/s"] = round(nbytes / median / 1e9, 2)
    benchmark.extra_info["MB moved"] = round(nbytes / 1e6, 1)
    print(f"\n{benchmark.group} [{benchmark.name}]: {median * 1e3:.1f} ms, {nbytes / median / 1e9:.2f} GB/s effective")


def _bench_loss(benchmark, impl, passes, fused, reference, inputs, shape, rows):
    """Time ``fused`` (backend="cpu") or ``reference`` on ``inputs``, forward or forward+backward."""
    pred, imgs, mask, p = inputs
    bwd = passes == "fwd+bwd"
    x = pred.clone().requires_grad_(bwd)
    fn = (lambda: fused(x, imgs, mask, p, backend="cpu")) if impl == "fused-cpu" else (lambda: reference(x, imgs, mask, p))

    def step():
        loss = fn()
        if bwd:
            torch.autograd.grad(loss, x)
        return loss

    benchmark.group = f"{fused.__name__} {passes} {shape}"
    _run(benchmark, step, _bytes(pred, imgs, rows(pred), bwd))


@pytest.mark.parametrize("impl", ["fused-cpu", "eager-reference"])
@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
def test_bench_mixmim_loss(benchmark, impl, passes):
    _bench_loss(benchmark, impl, passes, mk.mixmim_loss, ref.mixmim_loss, _mixmim_inputs(),
                "B=16 224px p=32 fp32", lambda pred: pred.shape[0] // 2 * pred.shape[1])


@pytest.mark.parametrize("impl", ["fused-cpu", "eager-reference"])
@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
def test_bench_masked_recon_loss(benchmark, impl, passes):
    _bench_loss(benchmark, impl, passes, mk.masked_recon_loss, ref.masked_recon_loss, _ummae_inputs(),
                "B=16 256px p=16 compact fp32", lambda pred: pred.shape[0] * pred.shape[1])

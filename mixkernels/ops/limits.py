"""Kernel limits: the one Python definition of each. Their C++ twin is
``csrc/include/mixkernels/limits.h``, exposed as ``torch.ops.mixkernels_C.limits(name)``;
tests/test_registry.py checks that the two agree."""

__all__ = ["KERNEL_HEAD_DIMS", "KERNEL_MAX_WINDOW_TOKENS", "CUDA_MAX_LOSS_PATCH", "LIMITS"]

KERNEL_HEAD_DIMS = (16, 32, 64, 128)  # head dims of the CUDA and Triton window attention kernels
KERNEL_MAX_WINDOW_TOKENS = 256  # tokens per window (wh*ww) of the CUDA and Triton window attention
CUDA_MAX_LOSS_PATCH = 32  # largest patch_size of the CUDA loss kernels (Triton and CPU take any)

# name in limits.h / mixkernels_C::limits -> value, as a tuple of ints
LIMITS = {
    "head_dims": KERNEL_HEAD_DIMS,
    "max_window_tokens": (KERNEL_MAX_WINDOW_TOKENS,),
    "cuda_max_loss_patch": (CUDA_MAX_LOSS_PATCH,),
}

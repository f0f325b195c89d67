// The fused forward's kernels for fp16, head_dim 32: one instance of launch_forward
// (window_attention_fwd.cuh) per translation unit, so that builds compile them in parallel.
#include "window_attention_fwd.cuh"

namespace mixkernels::cuda::wattn {
template MK_WATTN_FWD_INSTANCE(__half, 32);
}  // namespace mixkernels::cuda::wattn

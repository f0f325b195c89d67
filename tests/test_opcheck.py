"""torch.library.opcheck on every registered mixkernels op, on a backend that runs here."""
import pytest
import torch

import mixkernels  # noqa: F401  (registers the ops)
from mixkernels import _ext
from mixkernels.ops import _dispatch

_FAMILY = {
    "mix_tokens": "mixing", "mix_tokens_backward": "mixing", "unmix_tokens": "mixing",
    "unmix_tokens_backward": "mixing", "window_partition": "windows", "window_merge": "windows",
    "uniform_sample": "uniform", "uniform_sample_backward": "uniform", "uniform_scatter": "uniform",
    "window_attention": "window_attention", "window_attention_backward": "window_attention",
    "mixmim_loss": "losses", "mixmim_loss_backward": "losses", "masked_recon_loss": "losses",
    "masked_recon_loss_backward": "losses",
}


def _registered():
    return sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("mixkernels::"))


def _backend(name, t):
    if _ext.has_kernel(name, "CPU"):
        return "cpu"
    if _dispatch.triton_reason(_FAMILY[name], name, t) is None:
        return "triton"
    pytest.skip(f"no CPU or Triton kernel for {name} yet")


def _u8(*shape, hi=2):
    return torch.randint(0, hi, shape, dtype=torch.uint8)


def _samples(name):
    """(args without backend, tensors whose grads matter) for each op: small CPU float32 shapes."""
    f = dict(dtype=torch.float32)
    if name in ("mix_tokens", "mix_tokens_backward"):
        return (torch.randn(3, 5, 4, **f, requires_grad=True), _u8(3, 5))
    if name == "unmix_tokens":
        return (torch.randn(3, 5, 4, **f, requires_grad=True), _u8(1, 5), torch.randn(4, **f, requires_grad=True),
                torch.randn(5, 4, **f, requires_grad=True))
    if name == "unmix_tokens_backward":
        return (torch.randn(6, 5, 4, **f), _u8(3, 5), True, True)
    if name == "window_partition":
        return (torch.randn(2, 4, 6, 3, **f, requires_grad=True), 2, 3, 1, 1)
    if name == "window_merge":
        return (torch.randn(8, 6, 3, **f, requires_grad=True), 4, 6, 2, 3, 1, 2)
    if name == "uniform_sample":
        return (torch.randn(2, 8, 8, 3, **f, requires_grad=True), _u8(2, 2, 2, hi=4), 2,
                torch.randn(3, **f, requires_grad=True), _u8(2, 2, 2))
    if name == "uniform_sample_backward":
        return (torch.randn(2, 4, 4, 3, **f), _u8(2, 2, 2, hi=4), 2, _u8(2, 2, 2), True)
    if name == "uniform_scatter":
        return (torch.randn(2, 4, 4, 3, **f, requires_grad=True), _u8(2, 2, 2, hi=4), 2)
    wa = (2, 4, 4, 1, 2)  # num_heads, wh, ww, sh, sw
    if name == "window_attention":
        return (torch.randn(2, 8, 4, 3 * 2 * 16, **f, requires_grad=True), *wa,
                torch.randn(49, 2, **f, requires_grad=True), torch.randn(2, 16, 16, **f, requires_grad=True),
                torch.randint(0, 2, (1, 8, 4), dtype=torch.int32), None, 4, 4, 0.25, True)
    if name == "window_attention_backward":
        qkv = torch.randn(2, 8, 4, 3 * 2 * 16, **f)
        rpb, ab = torch.randn(49, 2, **f), torch.randn(2, 16, 16, **f)
        b = _backend("window_attention", qkv)
        out, lse = torch.ops.mixkernels.window_attention(qkv, *wa, rpb, ab, None, None, 4, 4, 0.25, True, b)
        return (torch.randn_like(out), qkv, out, lse, *wa, rpb, ab, None, None, 4, 4, 0.25, True, True, True)
    imgs = torch.randn(2, 3, 8, 8, **f)
    if name == "mixmim_loss":
        return (torch.randn(4, 4, 48, **f, requires_grad=True), imgs, _u8(1, 4), 4, True, 1e-6)
    if name == "mixmim_loss_backward":
        return (torch.randn(2, 4, **f), torch.randn(4, 4, 48, **f), imgs, _u8(2, 4), 4, True, 1e-6)
    idx = torch.tensor([[0, -1, 2, 3], [-1, 1, -1, 3]])
    if name == "masked_recon_loss":
        return (torch.randn(2, 4, 48, **f, requires_grad=True), imgs, idx, 4, False, 1e-6)
    if name == "masked_recon_loss_backward":
        return (torch.randn(2, 4, **f), torch.randn(2, 4, 48, **f), imgs, idx, 4, True, 1e-6)
    raise AssertionError(f"no opcheck sample for mixkernels::{name}: add one")


def test_every_registered_op_has_a_sample():
    names = _registered()
    assert "mix_tokens" in names and "window_attention" in names
    for n in names:
        assert n in _FAMILY, f"mixkernels::{n} has no opcheck sample/family"


@pytest.mark.parametrize("name", sorted(_FAMILY))
def test_opcheck(name):
    args = _samples(name)
    if name.endswith("_backward"):  # backward ops are not differentiable (no double backward)
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    b = _backend(name, args[0])
    torch.library.opcheck(getattr(torch.ops.mixkernels, name), (*args, b))

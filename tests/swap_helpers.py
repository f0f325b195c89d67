"""Shared checks for the swap compatibility matrix (tests/test_compat*.py)."""
import copy
import io
import pickle

import torch

from mixkernels import swap_swin
from mixkernels.testing import assert_close_2x

# swapped vs unswapped, both fp32: max |a - b| <= RTOL * max |b| + ATOL. fp32 rounding is ~1e-6 of the
# tensor's scale (summed gradients included); a wrong mask, bias or shift is ~1e-1.
RTOL, ATOL = 1e-4, 1e-5


def swapped_copy(model, **kw):
    """``swap_swin`` on a deep copy; asserts it kept the parameter objects and the state_dict."""
    s = copy.deepcopy(model)
    params = dict(s.named_parameters())
    before = {k: v.clone() for k, v in s.state_dict().items()}
    assert swap_swin(s, **kw) is s
    assert all(p is params[n] for n, p in s.named_parameters())
    after = s.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k]), k
    return s


def close(a, b, what="output", rtol=RTOL, atol=ATOL):
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= rtol * scale + atol, f"{what}: max error {err:.3e} > {rtol:.0e} * {scale:.3e} + {atol:.0e}"


def _tensor(out):
    """The tensor to compare from a model output (tensor, tuple/list, or a transformers ModelOutput)."""
    if torch.is_tensor(out):
        return out
    if isinstance(out, dict):
        for k in ("loss", "logits", "reconstruction", "last_hidden_state"):
            if out.get(k) is not None:
                return out[k]
    if isinstance(out, (tuple, list)):
        return torch.cat([o.flatten() for o in out])
    raise TypeError(type(out))


def run(model, x, train, seed, backward=True, **kw):
    """Forward (+ backward of a fixed random projection) with a fixed RNG; returns (out, dx, param grads)."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(backward)
    torch.manual_seed(seed)
    out = _tensor(model(x, **kw))
    if not backward:
        return out.detach(), None, {}
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(out.dtype)
    out.backward(g)
    grads = {n.replace("_orig_mod.", ""): p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def assert_same_run(a, b, what=""):
    (oa, xa, ga), (ob, xb, gb) = a, b
    close(ob, oa, f"{what} output")
    if xa is not None:
        close(xb, xa, f"{what} input grad")
    assert sorted(ga) == sorted(gb), f"{what}: parameters with gradients differ"
    for n in ga:
        close(gb[n], ga[n], f"{what} grad {n}")


def assert_matches_fp64_rule(orig, swapped, x, **kw):
    """flash-attn's rule on every output and gradient: |swapped32 - orig64| <= 2 |orig32 - orig64| + atol."""
    o64 = run(copy.deepcopy(orig).double(), x.double(), False, 0, **kw)
    o32 = run(orig, x, False, 0, **kw)
    s32 = run(swapped, x, False, 0, **kw)
    assert_close_2x(s32[0], o64[0], o32[0], name="output")
    assert_close_2x(s32[1], o64[1], o32[1], name="input grad")
    assert sorted(s32[2]) == sorted(o64[2])
    for n in o64[2]:
        assert_close_2x(s32[2][n], o64[2][n], o32[2][n], name=f"grad {n}")


def round_trips(model):
    """deepcopy and pickle copies of ``model``."""
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return [copy.deepcopy(model), pickle.loads(pickle.dumps(model)), torch.load(buf, weights_only=False)]

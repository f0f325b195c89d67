"""Smoke test of an installed mixkernels (CI's install paths): every public op on CPU tensors,
forward and backward against the reference, on the backend the automatic choice picks; that
choice must be the compiled CPU kernels, loaded from where the install path says.

    python scripts/smoke_ops.py EXPECTED      # EXPECTED: install | cache | first use | any

Run it outside the source checkout so the installed package is imported.
"""
import os
import sys
import time

import torch

EXPECTED = sys.argv[1] if len(sys.argv) > 1 else "any"
import mixkernels as mk  # noqa: E402
from mixkernels import _ext, info  # noqa: E402
from mixkernels import reference as ref  # noqa: E402

assert not os.path.exists(os.path.join(os.getcwd(), "mixkernels")), "run me outside the source checkout"
print(f"mixkernels from {os.path.dirname(mk.__file__)}; CPU kernels before the first call: {_ext.loaded_from('cpu')}")
t0 = time.time()
B, H, C, nh, w = 2, 14, 32, 2, 7
x = torch.randn(B, H, H, C, requires_grad=True)
qkv = torch.randn(B, H, H, 3 * C, requires_grad=True)
rpb = torch.randn((2 * w - 1) ** 2, nh, requires_grad=True)
grp = torch.randint(0, 2, (H, H))
mask = torch.rand(H * H) < 0.5
xl = torch.randn(B, H * H, C, requires_grad=True)
tok = torch.randn(C, requires_grad=True)
keep, sec = mk.uniform_masks(B, (H // 2, H // 2))
comp = torch.randn(B, H // 2, H // 2, C, requires_grad=True)
imgs = torch.randn(B, 3, 64, 64)
m16 = torch.rand(16) < 0.5
pred2 = torch.randn(2 * B, 16, 16 * 16 * 3, requires_grad=True)
pred = torch.randn(B, 16, 16 * 16 * 3, requires_grad=True)
win = torch.randn(B * 4, 49, C, requires_grad=True)
calls = {
    "window_attention": (lambda m: m.window_attention(qkv, nh, w, rel_pos_bias=rpb, group=grp), (qkv, rpb)),
    "mix_tokens": (lambda m: m.mix_tokens(xl, mask), (xl,)),
    "unmix_tokens": (lambda m: m.unmix_tokens(xl, mask, tok), (xl, tok)),
    "window_partition": (lambda m: m.window_partition(x, w, 3), (x,)),
    "window_merge": (lambda m: m.window_merge(win, w, H, H, 3), (win,)),
    "uniform_sample": (lambda m: m.uniform_sample(x, keep, 1, mask_token=tok, secondary=sec), (x, tok)),
    "uniform_scatter": (lambda m: m.uniform_scatter(comp, keep, 1), (comp,)),
    "mixmim_loss": (lambda m: m.mixmim_loss(pred2, imgs, m16, 16), (pred2,)),
    "masked_recon_loss": (lambda m: m.masked_recon_loss(pred, imgs, m16, 16), (pred,)),
}
for name, (call, leaves) in calls.items():
    out, want = call(mk), call(ref)
    g = torch.randn_like(out)
    got_g, want_g = torch.autograd.grad(out, leaves, g), torch.autograd.grad(want, leaves, g)
    err = max([(out - want).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(got_g, want_g)])
    assert err < 1e-4, f"{name}: max error {err}"
print(f"every public op ran and matched the reference ({time.time() - t0:.1f} s, first-use build included)")
src = _ext.loaded_from("cpu")
print(f"CPU kernels: {src} ({_ext._source.get('cpu')})")
auto = {name: choice for name, choice, _ in info.backend_table("cpu")}
print("automatic backend on CPU tensors:", auto)
assert all(v == "cpu" for v in auto.values()), auto
assert src is not None and (EXPECTED == "any" or src == EXPECTED), f"CPU kernels from {src!r}, expected {EXPECTED!r}"
print("smoke ok")

"""Bad input raises ValueError/TypeError naming the argument and what it got, on every public op."""
import pytest
import torch

import mixkernels as mk

f32 = torch.float32


def _qkv(B=2, H=8, W=8, nH=2, d=16, dtype=f32):
    return torch.randn(B, H, W, 3 * nH * d, dtype=dtype)


CASES = [
    # (id, call, exception, message fragment)
    ("wa-qkv-type", lambda: mk.window_attention([1.0], 2, 4), TypeError, "qkv must be a torch.Tensor"),
    ("wa-qkv-rank", lambda: mk.window_attention(torch.randn(8, 8, 96), 2, 4), ValueError, "qkv must have 4 dims"),
    ("wa-qkv-dtype", lambda: mk.window_attention(torch.zeros(2, 8, 8, 96, dtype=torch.int32), 2, 4), TypeError, "qkv must be float"),
    ("wa-heads", lambda: mk.window_attention(_qkv(), 5, 4), ValueError, "num_heads=5"),
    ("wa-heads-type", lambda: mk.window_attention(_qkv(), 2.0, 4), TypeError, "num_heads must be an int"),
    ("wa-window", lambda: mk.window_attention(_qkv(H=9), 2, 4), ValueError, "window_size (4, 4) must divide"),
    ("wa-window-type", lambda: mk.window_attention(_qkv(), 2, "4"), TypeError, "window_size must be an int"),
    ("wa-shift", lambda: mk.window_attention(_qkv(), 2, 4, shift_size=4), ValueError, "shift_size (4, 4) must be smaller"),
    ("wa-shift-neg", lambda: mk.window_attention(_qkv(), 2, 4, shift_size=-1), ValueError, "shift_size must be >= 0"),
    ("wa-rpb", lambda: mk.window_attention(_qkv(), 2, 4, rel_pos_bias=torch.randn(49, 3)), ValueError, "rel_pos_bias must have shape (49, 2)"),
    ("wa-bias", lambda: mk.window_attention(_qkv(), 2, 4, attn_bias=torch.randn(2, 16, 15)), ValueError, "attn_bias must have shape (2, 16, 16)"),
    ("wa-group", lambda: mk.window_attention(_qkv(), 2, 4, group=torch.zeros(8, 7, dtype=torch.long)), ValueError, "group must have shape (8, 8)"),
    ("wa-group-dtype", lambda: mk.window_attention(_qkv(), 2, 4, group=torch.zeros(8, 8)), TypeError, "group must have dtype"),
    ("wa-coords-range", lambda: mk.window_attention(_qkv(), 2, 4, coords=torch.zeros(8, 8, 2, dtype=torch.long)), ValueError, "coord_range"),
    ("wa-coords-shape", lambda: mk.window_attention(_qkv(), 2, 4, coords=torch.zeros(8, 8, 3, dtype=torch.long), coord_range=8), ValueError, "coords must have shape"),
    ("wa-scale", lambda: mk.window_attention(_qkv(), 2, 4, scale="x"), TypeError, "scale must be a float"),
    ("wa-backend", lambda: mk.window_attention(_qkv(), 2, 4, backend="fast"), ValueError, "backend must be one of"),
    ("wa-headdim", lambda: mk.window_attention(_qkv(d=12), 2, 4, backend="triton"), mk.BackendUnavailable, "head_dim 12"),
    ("mix-rank", lambda: mk.mix_tokens(torch.randn(4, 5), torch.ones(5)), ValueError, "x must have 3 or 4 dims"),
    ("mix-mask-shape", lambda: mk.mix_tokens(torch.randn(2, 5, 3), torch.ones(4)), ValueError, "mask must have shape (5,)"),
    ("mix-mask-type", lambda: mk.mix_tokens(torch.randn(2, 5, 3), [1, 0]), TypeError, "mask must be a torch.Tensor"),
    ("unmix-token", lambda: mk.unmix_tokens(torch.randn(2, 5, 3), torch.ones(5), torch.randn(4)), ValueError, "mask_token must have 3 elements"),
    ("unmix-pos", lambda: mk.unmix_tokens(torch.randn(2, 5, 3), torch.ones(5), torch.randn(3), torch.randn(1, 4, 3)), ValueError, "pos_embed must broadcast"),
    ("part-window", lambda: mk.window_partition(torch.randn(1, 6, 6, 2), 4), ValueError, "must divide"),
    ("merge-shape", lambda: mk.window_merge(torch.randn(3, 16, 2), 4, 8, 8), ValueError, "windows must have shape (B*4, 16, C)"),
    ("merge-H", lambda: mk.window_merge(torch.randn(4, 16, 2), 4, 0, 8), ValueError, "H must be positive"),
    ("us-unit", lambda: mk.uniform_sample(torch.randn(1, 6, 6, 2), torch.zeros(1, 1, 1, dtype=torch.long), 2), ValueError, "divisible by 2*unit"),
    ("us-keep-shape", lambda: mk.uniform_sample(torch.randn(1, 8, 8, 2), torch.zeros(1, 3, 2, dtype=torch.long), 2), ValueError, "keep must have shape (1, 2, 2)"),
    ("us-keep-range", lambda: mk.uniform_sample(torch.randn(1, 8, 8, 2), torch.full((1, 2, 2), 4), 2), ValueError, "keep must hold values in 0..3"),
    ("us-keep-dtype", lambda: mk.uniform_sample(torch.randn(1, 8, 8, 2), torch.zeros(1, 2, 2), 2), TypeError, "keep must have dtype"),
    ("us-token-missing", lambda: mk.uniform_sample(torch.randn(1, 8, 8, 2), torch.zeros(1, 2, 2, dtype=torch.long), 2,
                                                   secondary=torch.zeros(1, 2, 2, dtype=torch.bool)), ValueError, "mask_token is required"),
    ("uscatter-unit", lambda: mk.uniform_scatter(torch.randn(1, 3, 4, 2), torch.zeros(1, 1, 2, dtype=torch.long), 2), ValueError, "divisible by unit"),
    ("mm-odd-batch", lambda: mk.mixmim_loss(torch.randn(3, 4, 48), torch.randn(2, 3, 8, 8), torch.ones(4), 4), ValueError, "pred must have shape (2B, L, D)"),
    ("mm-width", lambda: mk.mixmim_loss(torch.randn(4, 4, 47), torch.randn(2, 3, 8, 8), torch.ones(4), 4), ValueError, "patch_size**2 * 3 = 48"),
    ("mm-img-div", lambda: mk.mixmim_loss(torch.randn(4, 4, 48), torch.randn(2, 3, 9, 8), torch.ones(4), 4), ValueError, "divisible by patch_size"),
    ("mm-mask-len", lambda: mk.mixmim_loss(torch.randn(4, 4, 48), torch.randn(2, 3, 8, 8), torch.ones(5), 4), ValueError, "mask must have shape (4,)"),
    ("mm-reduction", lambda: mk.mixmim_loss(torch.randn(4, 4, 48), torch.randn(2, 3, 8, 8), torch.ones(4), 4, reduction="sum"), ValueError, "reduction must be one of"),
    ("mm-channels", lambda: mk.mixmim_loss(torch.randn(4, 4, 48), torch.randn(2, 1, 8, 8), torch.ones(4), 4), ValueError, "imgs must be (B, 3, H, W)"),
    ("ml-compact", lambda: mk.masked_recon_loss(torch.randn(2, 2, 48), torch.randn(2, 3, 8, 8),
                                                torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]]), 4), ValueError, "mask selects [2, 1]"),
    ("ml-batch", lambda: mk.masked_recon_loss(torch.randn(3, 4, 48), torch.randn(2, 3, 8, 8), torch.ones(4), 4), ValueError, "pred's batch"),
    ("ml-patch-type", lambda: mk.masked_recon_loss(torch.randn(2, 4, 48), torch.randn(2, 3, 8, 8), torch.ones(4), 4.0), TypeError, "patch_size must be an int"),
]


@pytest.mark.parametrize("call,exc,msg", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(call, exc, msg):
    with pytest.raises(exc) as info:
        call()
    assert msg in str(info.value), f"message {str(info.value)!r} lacks {msg!r}"

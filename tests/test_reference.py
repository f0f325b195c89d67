"""The executable spec (mixkernels.reference) against timm and torchvision Swin, and its own invariants."""
import pytest
import torch

from mixkernels import reference as R


def _torchvision():
    from mixkernels._compat import import_torchvision

    return import_torchvision()


@pytest.mark.parametrize("shift", [0, 3])
@pytest.mark.parametrize("window,res", [(7, (14, 21)), (4, (8, 8))])
def test_reference_matches_timm_block_attention(shift, window, res):
    _torchvision()
    from timm.models.swin_transformer import SwinTransformerBlock

    if shift >= window:
        pytest.skip("shift must be smaller than the window")
    C, nH = 24, 3
    blk = SwinTransformerBlock(C, res, num_heads=nH, window_size=window, shift_size=shift).double().eval()
    with torch.no_grad():
        blk.attn.relative_position_bias_table.normal_()
    x = torch.randn(2, *res, C, dtype=torch.float64)
    want = blk._attn(x)
    got = blk.attn.proj(
        R.window_attention(blk.attn.qkv(x), nH, window, shift_size=shift, rel_pos_bias=blk.attn.relative_position_bias_table)
    )
    # timm masks with -100 instead of -inf: exp(-100) is below float64 resolution here.
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shift", [0, 2])
def test_reference_matches_torchvision_shifted_window_attention(shift):
    tv = _torchvision()
    from torchvision.models.swin_transformer import shifted_window_attention

    C, nH, ws = 32, 4, (4, 4)
    H, W = 8, 12
    qkv = torch.nn.Linear(C, 3 * C).double()
    proj = torch.nn.Linear(C, C).double()
    table = torch.randn((2 * ws[0] - 1) * (2 * ws[1] - 1), nH, dtype=torch.float64)
    idx = R.relative_position_index(*ws)
    bias = table[idx.reshape(-1)].reshape(ws[0] * ws[1], ws[0] * ws[1], nH).permute(2, 0, 1).unsqueeze(0)
    x = torch.randn(3, H, W, C, dtype=torch.float64)
    want = shifted_window_attention(
        x, qkv.weight, proj.weight, bias, list(ws), nH, [shift, shift],
        qkv_bias=qkv.bias, proj_bias=proj.bias, training=False,
    )
    got = proj(R.window_attention(qkv(x), nH, ws, shift_size=shift, rel_pos_bias=table))
    assert tv is not None
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_relative_position_index_matches_timm():
    from timm.models.swin_transformer import get_relative_position_index

    for wh, ww in [(7, 7), (7, 5), (3, 4)]:
        assert torch.equal(R.relative_position_index(wh, ww), get_relative_position_index(wh, ww))


def test_group_mask_blocks_cross_group_attention():
    """With a group mask, each token's output only mixes values of its own group."""
    B, H, W, nH, d = 2, 4, 4, 2, 3
    qkv = torch.randn(B, H, W, 3 * nH * d, dtype=torch.float64)
    group = torch.rand(B, H, W) > 0.5
    out = R.window_attention(qkv, nH, 4, group=group)
    # Zeroing the other group's values must not change a token's output.
    v = qkv[..., 2 * nH * d :]
    for b in range(B):
        for g in (False, True):
            sel = group[b] == g
            qkv2 = qkv.clone()
            qkv2[b, ~sel, 2 * nH * d :] = 0
            out2 = R.window_attention(qkv2, nH, 4, group=group)
            torch.testing.assert_close(out2[b][sel], out[b][sel])
    assert v.abs().sum() > 0


def test_coords_equal_window_local_positions_reproduce_plain_table():
    B, H, W, nH, d, ws = 2, 6, 6, 2, 4, 3
    qkv = torch.randn(B, H, W, 3 * nH * d, dtype=torch.float64)
    table = torch.randn((2 * ws - 1) ** 2, nH, dtype=torch.float64)
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    coords = torch.stack([ys % ws, xs % ws], -1)
    a = R.window_attention(qkv, nH, ws, rel_pos_bias=table)
    b = R.window_attention(qkv, nH, ws, rel_pos_bias=table, coords=coords, coord_range=(ws, ws))
    torch.testing.assert_close(a, b)
    # True image coordinates give the same differences inside a window: a table over the
    # whole image's offset grid that agrees with `table` on window offsets gives the same result.
    big = torch.randn((2 * H - 1) * (2 * W - 1), nH, dtype=torch.float64)
    for dy in range(-(ws - 1), ws):
        for dx in range(-(ws - 1), ws):
            big[(dy + H - 1) * (2 * W - 1) + dx + W - 1] = table[(dy + ws - 1) * (2 * ws - 1) + dx + ws - 1]
    c = R.window_attention(qkv, nH, ws, rel_pos_bias=big, coords=torch.stack([ys, xs], -1), coord_range=(H, W))
    torch.testing.assert_close(a, c)


@pytest.mark.parametrize("shift", [0, (1, 2)])
def test_partition_merge_inverse_and_equal_to_roll_partition(shift):
    x = torch.randn(3, 6, 10, 5)
    w = R.window_partition(x, (3, 5), shift)
    sh = shift if isinstance(shift, tuple) else (shift, shift)
    rolled = torch.roll(x, (-sh[0], -sh[1]), (1, 2))
    manual = rolled.reshape(3, 2, 3, 2, 5, 5).permute(0, 1, 3, 2, 4, 5).reshape(-1, 15, 5)
    assert torch.equal(w, manual)
    assert torch.equal(R.window_merge(w, (3, 5), 6, 10, shift), x)


def test_mix_is_an_involution_for_shared_masks_and_unmix_halves():
    x = torch.randn(5, 10, 4)
    m = torch.rand(10) > 0.5
    mixed = R.mix_tokens(x, m)
    assert torch.equal(R.mix_tokens(mixed, m), x)
    assert torch.equal(mixed[0, m], x[4, m]) and torch.equal(mixed[0, ~m], x[0, ~m])
    tok = torch.randn(4)
    out = R.unmix_tokens(x, m, tok)
    assert out.shape == (10, 10, 4)
    assert torch.equal(out[:5, m], tok.expand(5, int(m.sum()), 4)) and torch.equal(out[:5, ~m], x[:, ~m])
    assert torch.equal(out[5:, ~m], tok.expand(5, int((~m).sum()), 4)) and torch.equal(out[5:, m], x[:, m])


def test_uniform_sample_scatter_roundtrip_and_secondary():
    B, H, W, C, u = 2, 8, 8, 3, 2
    x = torch.randn(B, H, W, C)
    keep = torch.randint(0, 4, (B, H // (2 * u), W // (2 * u)))
    comp = R.uniform_sample(x, keep, u)
    assert comp.shape == (B, H // 2, W // 2, C)
    # Compact cell (i, j) is the kept unit of the (i, j) 2x2 cell.
    for b in range(B):
        for i in range(H // (2 * u)):
            for j in range(W // (2 * u)):
                k = int(keep[b, i, j])
                y0, x0 = (2 * i + k // 2) * u, (2 * j + k % 2) * u
                assert torch.equal(comp[b, i * u : (i + 1) * u, j * u : (j + 1) * u], x[b, y0 : y0 + u, x0 : x0 + u])
    back = R.uniform_scatter(comp, keep, u)
    assert torch.equal(R.uniform_sample(back, keep, u), comp)
    assert (back != 0).sum() == comp.numel()
    sec = torch.zeros_like(keep, dtype=torch.bool)
    sec[0, 1, 0] = True
    tok = torch.randn(C)
    comp2 = R.uniform_sample(x, keep, u, mask_token=tok, secondary=sec)
    assert torch.equal(comp2[0, u : 2 * u, 0:u], tok.expand(u, u, C))
    assert torch.equal(comp2[1], comp[1])


def test_losses_follow_mae_patchify_and_unbiased_norm():
    B, p = 2, 4
    imgs = torch.randn(B, 3, 8, 12, dtype=torch.float64)
    t = R.patchify(imgs, p)
    assert t.shape == (B, 6, p * p * 3)
    # (p, p, 3) order: element (r, c, ch) of patch (0, 1).
    assert t[0, 1, (1 * p + 2) * 3 + 1] == imgs[0, 1, 1, p + 2]
    n = R.patch_targets(imgs, p, True, 1e-6)
    manual = (t - t.mean(-1, keepdim=True)) / (t.var(-1, unbiased=True, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(n, manual)
    pred = torch.randn(2 * B, 6, p * p * 3, dtype=torch.float64)
    m = torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool)
    per = R.mixmim_loss(pred, imgs, m, p, reduction="none")
    mf = m.double()[None, :, None]
    manual = ((pred[:B] * mf + pred[B:].flip(0) * (1 - mf) - n) ** 2).mean(-1)
    torch.testing.assert_close(per, manual)
    assert torch.allclose(R.mixmim_loss(pred, imgs, m, p), manual.mean())
    ml = R.masked_recon_loss(pred[:B], imgs, m, p, reduction="per_image")
    torch.testing.assert_close(ml, (((pred[:B] - n) ** 2).mean(-1) * m).sum(1) / m.sum())
    compact = pred[:B][:, m]
    torch.testing.assert_close(R.masked_recon_loss(compact, imgs, m, p), R.masked_recon_loss(pred[:B], imgs, m, p))

"""What the static report measures: every shipped op at the headline shapes, with its HBM floor.

A :class:`Case` is one op (forward or backward) x shape x dtype. It knows
* how to call our Triton launchers at that geometry (``triton()``, captured by ``aot.capture``),
* the call line(s) of the CUDA capture harness (``cuda``),
* the floor: the bytes the op must move at least (each input read once, each output written
  once; DESIGN.md section 7), and its element count: score elements ``B*nW*nH*N*N`` for
  attention, ``floor_bytes / 16`` for token ops and losses ("instructions per 16 B moved").

Headline shapes (DESIGN.md sections 1 and 7): MixMIM-B stages 1-4 (B=128, 224 px, patch 4,
windows 14/14/14/7, head_dim 32, heads 4/8/16/32, batch-shared group mask, rel-pos bias, no
shift), Swin-T/B (window 7, shift 3 where the stage is larger than the window), UM-MAE Swin-T
(256 px, compact 32x32 / 16x16 image, window 8, true coordinates per image, coord range 64),
SwinV2-T / SwinV2-B window 16 in cosine mode (256 px, CPB table as rel_pos_bias; Triton only until the
CUDA capture harness has the cosine launcher), and the token ops / losses at MixMIM-B / UM-MAE sizes. Backward configs are the op layer's defaults:
rel-pos-bias gradient on, fast (non-deterministic) bias-gradient reduction.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List

__all__ = ["Case", "AttnShape", "ATTN_SHAPES", "build_cases", "DTYPES"]

DTYPES = ("bf16", "fp16", "fp32")
_ES = {"bf16": 2, "fp16": 2, "fp32": 4}
_CODE = {"fp32": 0, "fp16": 1, "bf16": 2}  # mixkernels::cuda::DType


@dataclass(frozen=True)
class AttnShape:
    label: str
    B: int
    H: int
    C: int
    heads: int
    window: int
    shift: int = 0
    group: bool = False
    coords: bool = False
    coord_range: int = 0  # 0: the window (no coords)
    cosine: bool = False  # SwinV2 cosine attention (logit scale; its gradient in the backward)

    @property
    def d(self) -> int:
        return self.C // self.heads

    @property
    def N(self) -> int:
        return self.window * self.window

    @property
    def nW(self) -> int:
        return (self.H // self.window) ** 2

    @property
    def r(self) -> int:
        return self.coord_range or self.window


ATTN_SHAPES = [
    AttnShape("mixmim-b-s1", 128, 56, 128, 4, 14, group=True),
    AttnShape("mixmim-b-s2", 128, 28, 256, 8, 14, group=True),
    AttnShape("mixmim-b-s3", 128, 14, 512, 16, 14, group=True),
    AttnShape("mixmim-b-s4", 128, 7, 1024, 32, 7, group=True),
    AttnShape("swin-t-s1-shift", 128, 56, 96, 3, 7, 3),
    AttnShape("swin-t-s2-shift", 128, 28, 192, 6, 7, 3),
    AttnShape("swin-t-s3-shift", 128, 14, 384, 12, 7, 3),
    AttnShape("swin-t-s4", 128, 7, 768, 24, 7),
    AttnShape("swin-b-s1-shift", 128, 56, 128, 4, 7, 3),
    AttnShape("swin-b-s2-shift", 128, 28, 256, 8, 7, 3),
    AttnShape("swin-b-s3-shift", 128, 14, 512, 16, 7, 3),
    AttnShape("swin-b-s4", 128, 7, 1024, 32, 7),
    AttnShape("ummae-t-s1", 128, 32, 96, 3, 8, coords=True, coord_range=64),
    AttnShape("ummae-t-s1-shift", 128, 32, 96, 3, 8, 4, coords=True, coord_range=64),
    AttnShape("ummae-t-s2-shift", 128, 16, 192, 6, 8, 4, coords=True, coord_range=64),
    # SwinV2-T (256 px, window 8, CPB table as rel_pos_bias) and SwinV2-B window 16 (multi-tile)
    AttnShape("swinv2-t-s1", 128, 64, 96, 3, 8, cosine=True),
    AttnShape("swinv2-t-s1-shift", 128, 64, 96, 3, 8, 4, cosine=True),
    AttnShape("swinv2-t-s3-shift", 128, 16, 384, 12, 8, 4, cosine=True),
    AttnShape("swinv2-t-s4", 128, 8, 768, 24, 8, cosine=True),
    AttnShape("swinv2-b-w16-s1-shift", 128, 64, 128, 4, 16, 8, cosine=True),
]
HEADLINE = ("mixmim-b-s1", "mixmim-b-s4", "swin-b-s1-shift", "swin-t-s1-shift", "ummae-t-s1-shift")


@dataclass
class Case:
    op: str  # window_attention_fwd, window_attention_bwd, mix_tokens, mix_tokens_bwd, ...
    shape: str
    dtype: str
    config: str
    params: Dict[str, Any]
    floor_bytes: float
    elements: float
    element_unit: str  # "score" or "16B"
    triton: Callable[[], None]
    cuda: List[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.op}|{self.shape}|{self.dtype}"


# ----------------------------------------------------------------------------- attention


def _attn_cases(s: AttnShape, dt: str) -> List[Case]:
    es = _ES[dt]
    tokens = s.B * s.H * s.H
    io = tokens * s.C * es  # one of q, k, v, o
    lse = tokens * s.heads * 4
    T = (2 * s.r - 1) ** 2
    side = T * s.heads * 4 + (s.H * s.H * 4 if s.group else 0) + (tokens * 8 if s.coords else 0)
    scores = s.B * s.nW * s.heads * s.N * s.N
    flags = ["rpb"] + (["group"] if s.group else []) + ([f"shift{s.shift}"] if s.shift else []) + \
        ([f"coords(r={s.r})"] if s.coords else []) + (["cosine"] if s.cosine else [])
    cfg = f"w{s.window} d{s.d} " + "+".join(flags)
    p = dict(B=s.B, H=s.H, W=s.H, C=s.C, heads=s.heads, d=s.d, window=s.window, shift=s.shift, N=s.N, nW=s.nW,
             group=s.group, coords=s.coords, r=s.r, T=T, es=es, cosine=s.cosine)
    line = (f"{s.B} {s.H} {s.H} {s.heads} {s.d} {s.window} {s.window} {s.shift} {s.shift} {s.r} {s.r} {_CODE[dt]} "
            f"1 0 {int(s.group)} {int(s.coords)} 1 {s.B}")

    def inputs():
        import torch

        tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]
        qkv = torch.empty(s.B, s.H, s.H, 3 * s.C, dtype=tdt)
        rpb = torch.empty(T, s.heads)
        grp = torch.empty(1, s.H, s.H, dtype=torch.int32) if s.group else None
        crd = torch.empty(s.B, s.H, s.H, 2, dtype=torch.int32) if s.coords else None
        last = torch.empty(s.heads) if s.cosine else s.d ** -0.5  # logit scale or softmax scale
        args = (s.heads, s.window, s.window, s.shift, s.shift, rpb, None, grp, crd, s.r, s.r, last)
        return qkv, args

    def fwd():
        from mixkernels.triton import window_attention as wa

        qkv, args = inputs()
        (wa.window_attention_cosine if s.cosine else wa.window_attention)(qkv, *args)

    def bwd():
        import torch

        from mixkernels.triton import window_attention as wa

        qkv, args = inputs()
        out = torch.empty(s.B, s.H, s.H, s.C, dtype=qkv.dtype)
        lse_t = torch.empty(s.B * s.nW, s.heads, s.N)
        if s.cosine:
            wa.window_attention_cosine_backward(torch.empty_like(out), qkv, out, lse_t, *args, True, False, True, False)
        else:
            wa.window_attention_backward(torch.empty_like(out), qkv, out, lse_t, *args, True, False, False)

    # (the CUDA capture harness has no cosine mode yet: cosine cases are Triton-only)
    return [
        Case("window_attention_fwd", s.label, dt, cfg, p, 4 * io + lse + side, scores, "score", fwd,
             [] if s.cosine else [f"wattn_fwd {line}"]),
        Case("window_attention_bwd", s.label, dt, cfg + (" drpb dls" if s.cosine else " drpb"), p,
             8 * io + lse + side, scores, "score", bwd, [] if s.cosine else [f"wattn_bwd {line} 1 0 0"]),
    ]


# ----------------------------------------------------------------------------- token ops + losses


def _tdt(dt):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]


def _token_cases(dt: str) -> List[Case]:
    es, c = _ES[dt], _CODE[dt]
    out: List[Case] = []

    def add(op, shape, cfg, params, floor, call, cuda):
        out.append(Case(op, shape, dt, cfg, dict(params, es=es), float(floor), floor / 16.0, "16B", call, cuda))

    # MixMIM-B encoder input: (B, L, C) = (128, 3136, 128), batch-shared mask.
    B, L, C = 128, 3136, 128
    n = B * L * C * es

    def mix(bwd):
        import torch

        from mixkernels.triton import mixing

        x = torch.empty(B, L, C, dtype=_tdt(dt))
        m = torch.empty(1, L, dtype=torch.uint8)
        (mixing.mix_tokens_backward if bwd else mixing.mix_tokens)(x, m)

    pm = dict(B=B, L=L, C=C, rows=B * L)
    add("mix_tokens", "mixmim-b-s1", "shared mask", pm, 2 * n + L, lambda: mix(False), [f"mix_fwd {B} {L} {C} 1 {c}"])
    add("mix_tokens_bwd", "mixmim-b-s1", "shared mask", pm, 2 * n + L, lambda: mix(True), [f"mix_bwd {B} {L} {C} 1 {c}"])

    # MixMIM-B decoder input: (128, 49, 512) + mask token + pos_embed; backward with both gradients.
    Bd, Ld, Cd = 128, 49, 512
    nd = Bd * Ld * Cd * es

    def unmix(bwd):
        import torch

        from mixkernels.triton import mixing

        m = torch.empty(1, Ld, dtype=torch.uint8)
        if bwd:
            mixing.unmix_tokens_backward(torch.empty(2 * Bd, Ld, Cd, dtype=_tdt(dt)), m, True, True)
        else:
            mixing.unmix_tokens(torch.empty(Bd, Ld, Cd, dtype=_tdt(dt)), m, torch.empty(Cd, dtype=_tdt(dt)),
                                torch.empty(Ld, Cd, dtype=_tdt(dt)))

    pu = dict(B=Bd, L=Ld, C=Cd, rows=2 * Bd * Ld)
    add("unmix_tokens", "mixmim-b-dec", "token+pos", pu, 3 * nd + Ld * Cd * es, lambda: unmix(False),
        [f"unmix_fwd {Bd} {Ld} {Cd} 1 {c} 1"])
    add("unmix_tokens_bwd", "mixmim-b-dec", "dtoken+dpos", pu, 3 * nd + Ld * Cd * 4 + Cd * 4, lambda: unmix(True),
        [f"unmix_bwd {Bd} {Ld} {Cd} 1 {c} 1 1"])

    # Window partition / merge at stage 1 (B=128, 56x56, C=128).
    H = 56
    nw = B * H * H * C * es
    for shape, w, sh in (("mixmim-b-s1", 14, 0), ("swin-b-s1-shift", 7, 3)):
        def part(merge, w=w, sh=sh):
            import torch

            from mixkernels.triton import windows

            if merge:
                windows.window_merge(torch.empty(B * (H // w) ** 2, w * w, C, dtype=_tdt(dt)), H, H, w, w, sh, sh)
            else:
                windows.window_partition(torch.empty(B, H, H, C, dtype=_tdt(dt)), w, w, sh, sh)

        pp = dict(B=B, H=H, W=H, C=C, window=w, shift=sh, rows=B * H * H)
        line = f"{B} {H} {H} {C} {w} {w} {sh} {sh} {c}"
        add("window_partition", shape, f"w{w} shift{sh}", pp, 2 * nw, lambda p=part: p(False), [f"partition {line}"])
        add("window_merge", shape, f"w{w} shift{sh}", pp, 2 * nw, lambda p=part: p(True), [f"merge {line}"])

    # UM-MAE Swin-T input: (128, 64, 64, 96) tokens, unit 4 (16 px), secondary masking 25%.
    Bu, Hu, Cu, u = 128, 64, 96, 4
    full = Bu * Hu * Hu * Cu * es
    comp = full // 4
    cells = Bu * (Hu // (2 * u)) ** 2

    def usample(kind):
        import torch

        from mixkernels.triton import uniform

        keep = torch.empty(Bu, Hu // (2 * u), Hu // (2 * u), dtype=torch.uint8)
        sec = torch.empty_like(keep)
        if kind == "fwd":
            uniform.uniform_sample(torch.empty(Bu, Hu, Hu, Cu, dtype=_tdt(dt)), keep, u, torch.empty(Cu, dtype=_tdt(dt)),
                                   sec)
        elif kind == "bwd":
            uniform.uniform_sample_backward(torch.empty(Bu, Hu // 2, Hu // 2, Cu, dtype=_tdt(dt)), keep, u, sec, True)
        else:
            uniform.uniform_scatter(torch.empty(Bu, Hu // 2, Hu // 2, Cu, dtype=_tdt(dt)), keep, u)

    pu2 = dict(B=Bu, H=Hu, W=Hu, C=Cu, unit=u, rows=Bu * Hu * Hu // 4, full_rows=Bu * Hu * Hu, secondary=0.25)
    line = f"{Bu} {Hu} {Hu} {Cu} {u} {c}"
    add("uniform_sample", "ummae-t", "unit4 secondary", pu2, 0.75 * comp + comp + 2 * cells, lambda: usample("fwd"),
        [f"usample {line} 1"])
    add("uniform_sample_bwd", "ummae-t", "unit4 secondary dtoken", pu2, comp + full + 2 * cells, lambda: usample("bwd"),
        [f"usample_bwd {line} 1 1"])
    add("uniform_scatter", "ummae-t", "unit4", pu2, comp + full + cells, lambda: usample("scatter"),
        [f"uscatter {line}"])

    # Losses: pred in the compute dtype, images float32 (autocast). MixMIM-B: 224 px, patch-32
    # targets (L=49, D=3072), batch-shared mask. UM-MAE: 256 px, patch 16 (L=256), 75% removed.
    ci = _CODE["fp32"]
    Bl, Hi, p = 128, 224, 32
    Ll, D = (Hi // p) ** 2, 3 * p * p
    imgs = Bl * 3 * Hi * Hi * 4

    def mixloss(bwd):
        import torch

        from mixkernels.triton import losses

        pred = torch.empty(2 * Bl, Ll, D, dtype=_tdt(dt))
        im = torch.empty(Bl, 3, Hi, Hi)
        m = torch.empty(1, Ll, dtype=torch.uint8)
        if bwd:
            losses.mixmim_loss_backward(torch.empty(Bl, Ll), pred, im, m, p, True, 1e-6)
        else:
            losses.mixmim_loss(pred, im, m, p, True, 1e-6)

    pl = dict(B=Bl, L=Ll, D=D, p=p, img=Hi, programs=Bl * Ll)
    used = Bl * Ll * D * es
    add("mixmim_loss", "mixmim-b-p32", "norm_pix", pl, used + imgs + Bl * Ll * 4, lambda: mixloss(False),
        [f"mixmim_loss_fwd {c} {ci} {Bl} {Hi} {Hi} {p} 1 0"])
    add("mixmim_loss_bwd", "mixmim-b-p32", "norm_pix", pl, used + imgs + Bl * Ll * 4 + 2 * used, lambda: mixloss(True),
        [f"mixmim_loss_bwd {c} {ci} {Bl} {Hi} {Hi} {p} 1 0"])
    Hm, pm_ = 256, 16
    Lm = (Hm // pm_) ** 2
    Lp, Dm = Lm * 3 // 4, 3 * pm_ * pm_

    def maskloss(bwd):
        import torch

        from mixkernels.triton import losses

        pred = torch.empty(Bl, Lp, Dm, dtype=_tdt(dt))
        im = torch.empty(Bl, 3, Hm, Hm)
        idx = torch.empty(Bl, Lp, dtype=torch.int64)
        if bwd:
            losses.masked_recon_loss_backward(torch.empty(Bl, Lp), pred, im, idx, pm_, True, 1e-6)
        else:
            losses.masked_recon_loss(pred, im, idx, pm_, True, 1e-6)

    pk = dict(B=Bl, L=Lm, Lp=Lp, D=Dm, p=pm_, img=Hm, programs=Bl * Lp)
    predb = Bl * Lp * Dm * es
    tgt = Bl * Lp * Dm * 4  # the image pixels of the counted patches
    add("masked_recon_loss", "ummae-p16", "norm_pix compact", pk, predb + tgt + Bl * Lp * 12, lambda: maskloss(False),
        [f"masked_loss_fwd {c} {ci} {Bl} {Lp} {Hm} {Hm} {pm_} 1"])
    add("masked_recon_loss_bwd", "ummae-p16", "norm_pix compact", pk, 2 * predb + tgt + Bl * Lp * 12,
        lambda: maskloss(True), [f"masked_loss_bwd {c} {ci} {Bl} {Lp} {Hm} {Hm} {pm_} 1"])
    return out


def build_cases(dtypes=DTYPES, shapes=None, ops=None) -> List[Case]:
    """Every case, filtered by dtype, shape label and op name (None: all)."""
    out: List[Case] = []
    for dt in dtypes:
        for s in ATTN_SHAPES:
            out += _attn_cases(s, dt)
        out += _token_cases(dt)
    if shapes:
        out = [c for c in out if c.shape in shapes]
    if ops:
        out = [c for c in out if c.op in ops]
    return out

#!/usr/bin/env python
"""Masked-image-modeling pretraining with mixkernels: MixMIM, UM-MAE or SimMIM (Swin / SwinV2).

Single process:   python examples/pretrain.py --method simmim --data /path/to/imagenet/train --model simmim_swin_base
Synthetic smoke:  python examples/pretrain.py --method ummae --synthetic --model ummae_swin_tiny_test --steps 10
Several GPUs:     torchrun --nproc_per_node 8 examples/pretrain.py --method mixmim --data ... [--fsdp]
(examples/pretrain_mixmim.py is this script with ``--method mixmim``.)

Recipes (``--method``): ``mixmim`` (MixMIM: mixed images, batch-shared mask drawn by the model, dual
reconstruction), ``ummae`` (UM-MAE: uniform sampling + secondary masking), ``simmim`` (SimMIM: mask
token at the patch embedding, 1x1-conv + PixelShuffle decoder, masked L1; Swin or SwinV2 encoder).
UM-MAE's and SimMIM's masks are drawn per image in the data pipeline, seeded by (seed, epoch,
image): the same image gets the same mask whichever rank or worker loads it, so N processes x
batch b train exactly like one process x batch N*b (up to float rounding). MixMIM mixes partners
inside each process's batch, as the official code does.

Data: a folder tree of images (e.g. ImageNet's train/; labels are ignored) or ``--synthetic``
random images. Unreadable files (truncated, empty, not images, over ``--max-image-pixels``) are
skipped, replaced by the next good image (every rank keeps the same number of batches) and listed
at the end of each epoch; every image mode is converted to RGB. bf16 autocast on CUDA
(``--no-amp`` to disable, ``--cpu-amp`` to also use it on the CPU), AdamW with warm-up + cosine
schedule, a progress line with images/s and loss.

Checkpoints every ``--save-every`` steps and at the end, crash-safe (mixkernels.train_utils):
one file ``<out>/checkpoint.pt`` in a single process or under DDP, a sharded folder
``<out>/checkpoint.dcp`` (torch.distributed.checkpoint) under FSDP2; the previous one is kept as
``.prev``. ``--resume`` continues from the newest usable one of either format: exactly where it
was taken (RNG states and the position inside the epoch are saved: on the CPU an interrupted and
resumed run gives the same losses bit for bit), at any world size (the sharded format is
resharded on load; a different world size restarts the data at the next epoch boundary).
Under torchrun the model is wrapped in DDP, or sharded with FSDP2 (``fully_shard`` per block)
when ``--fsdp`` is given.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mixkernels import models, ops  # noqa: E402
from mixkernels import train_utils as tu  # noqa: E402
from mixkernels.models._common import DecoderBlock  # noqa: E402
from mixkernels.models.ummae import UMSwinBlock  # noqa: E402
from mixkernels.nn import SwinBlock, SwinV2Block  # noqa: E402
from mixkernels.train_utils import distributed as dtu  # noqa: E402


# ---------------------------------------------------------------- recipes
@dataclass(frozen=True)
class Recipe:
    models: Tuple[str, ...]
    default: str
    mask_ratio: float  # the model's mask_ratio argument (UM-MAE: its secondary masking ratio)
    lr: float  # base lr for batch 256
    masks: Optional[Callable]  # model -> picklable per-image mask maker (data pipeline), or None
    step: Callable  # (model, imgs, masks) -> loss


class _UMMAEMasks:
    """UM-MAE's per-image masks: ``keep`` (and ``secondary`` when secondary masking is on)."""

    def __init__(self, model):
        self.cells, self.ratio = model.units // 2, model.vis_mask_ratio

    def __call__(self):
        keep, sec = ops.uniform_masks(1, (self.cells, self.cells), secondary_ratio=max(self.ratio, 0.0))
        return (keep[0], sec[0]) if self.ratio > 0 else (keep[0],)


class _SimMIMMasks:
    def __init__(self, model):
        self.gen = model.mask_generator

    def __call__(self):
        return (self.gen(1)[0],)


def _ummae_step(model, imgs, masks):
    return model(imgs, masks[0], masks[1] if len(masks) > 1 else None)[0]


RECIPES: Dict[str, Recipe] = {
    "mixmim": Recipe(("mixmim_tiny", "mixmim_base", "mixmim_large", "mixmim_huge"), "mixmim_base", 0.5, 1.5e-4,
                     None, lambda m, x, masks: m(x)[0]),
    "ummae": Recipe(("ummae_swin_tiny_test", "ummae_swin_tiny", "ummae_swin_large"), "ummae_swin_tiny", 0.25,
                    1.5e-4, _UMMAEMasks, _ummae_step),
    "simmim": Recipe(("simmim_swin_tiny_test", "simmim_swinv2_tiny_test", "simmim_swin_base", "simmim_swinv2_base"),
                     "simmim_swin_base", 0.6, 5e-5, _SimMIMMasks,  # SimMIM: 1e-4 per 512 images
                     lambda m, x, masks: m(x, masks[0])[0]),
}
SHARD_UNITS = (SwinBlock, SwinV2Block, UMSwinBlock, DecoderBlock)  # FSDP2 units


def build_model(args, recipe: Recipe):
    kw = dict(backend=args.backend)
    ratio = recipe.mask_ratio if args.mask_ratio is None else args.mask_ratio
    kw["vis_mask_ratio" if args.method == "ummae" else "mask_ratio"] = ratio
    if args.img_size:
        kw["img_size"] = args.img_size
    if args.drop_path is not None:
        kw["drop_path_rate"] = args.drop_path
    return getattr(models, args.model)(**kw)


def parse_args(argv=None, method: Optional[str] = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default=method or "mixmim", choices=sorted(RECIPES))
    p.add_argument("--model", default=None, help="default: the method's base model; see RECIPES")
    p.add_argument("--data", default=None, help="image folder (class subfolders)")
    p.add_argument("--synthetic", action="store_true", help="random images instead of --data")
    p.add_argument("--img-size", type=int, default=None, help="default: the model's")
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--steps", type=int, default=1000, help="total optimizer steps")
    p.add_argument("--lr", type=float, default=None, help="base lr for batch 256 (scaled linearly); default per method")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--mask-ratio", type=float, default=None,
                   help="default per method: MixMIM 0.5, SimMIM 0.6, UM-MAE's secondary masking 0.25")
    p.add_argument("--drop-path", type=float, default=None, help="stochastic depth (default: the model's)")
    p.add_argument("--backend", default=None, help="force one mixkernels backend (default: automatic)")
    p.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on CUDA")
    p.add_argument("--cpu-amp", action="store_true", help="bf16 autocast on the CPU too")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP (under torchrun)")
    p.add_argument("--out", default=None, help="checkpoint directory (default ./<method>_out)")
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--loss-log", default=None, help="append 'step loss' (exact, float.hex) of every step to this file")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--max-image-pixels", type=int, default=tu.data.DEFAULT_MAX_PIXELS,
                   help="skip images with more pixels (decompression-bomb guard)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kill-after-step", type=int, default=None, help=argparse.SUPPRESS)  # tests: SIGKILL itself
    p.add_argument("--dump-params", default=None, help=argparse.SUPPRESS)  # tests: <file>.rank<r>, full params
    a = p.parse_args(argv)
    recipe = RECIPES[a.method]
    a.model = a.model or recipe.default
    if a.model not in recipe.models:
        p.error(f"--model {a.model} is not a {a.method} model (choose from {', '.join(recipe.models)})")
    a.lr = recipe.lr if a.lr is None else a.lr
    a.out = a.out or f"./{a.method}_out"
    if not a.synthetic and a.data is None:
        p.error("give --data DIR or --synthetic")
    return a


# ---------------------------------------------------------------- data
class Synthetic(torch.utils.data.Dataset):
    def __init__(self, n, img):
        self.n, self.img = n, img

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.randn(3, self.img, self.img, generator=g), 0


class WithMasks(torch.utils.data.Dataset):
    """``(image, masks)``: the recipe's per-image masks drawn right after the image, inside
    SeededSamples' RNG seeded by (seed, epoch, index): the same masks on any rank or worker."""

    def __init__(self, dataset, masks: Optional[Callable]):
        self.dataset, self.masks = dataset, masks

    def __len__(self):
        return len(self.dataset)

    def path(self, index):
        path = getattr(self.dataset, "path", None)
        return path(index) if callable(path) else f"sample {index}"

    def __getitem__(self, i):
        img = self.dataset[i][0]
        return img, (self.masks() if self.masks is not None else ())


def make_loader(args, img, rank, world, masks):
    """DataLoader over a resumable sampler; samples load with RNGs seeded per (epoch, index)."""
    if args.synthetic:
        ds = Synthetic(max(args.batch_size * world * 4, 64), img)
    else:
        from mixkernels._compat import import_torchvision

        tv = import_torchvision()
        T = tv.transforms
        tf = T.Compose([
            T.RandomResizedCrop(img, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(), T.ToTensor(),
            T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ])
        ds = tu.ImageFiles(args.data, transform=tf, max_pixels=args.max_image_pixels)
    if len(ds) < args.batch_size * world:
        raise SystemExit(f"the dataset has {len(ds)} samples, fewer than one batch ({args.batch_size} x {world} ranks)")
    sampler = tu.ResumableSampler(len(ds), rank=rank, world=world, shuffle=True, seed=args.seed)
    workers = 0 if args.synthetic else args.workers
    loader = torch.utils.data.DataLoader(
        tu.SeededSamples(WithMasks(ds, masks), seed=args.seed), batch_size=args.batch_size, sampler=sampler,
        drop_last=True, collate_fn=tu.collate, num_workers=workers, pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        generator=torch.Generator().manual_seed(args.seed),  # worker seeds: never drawn from the global RNG
    )
    return loader, sampler


# ---------------------------------------------------------------- checkpoints
def save(out, model, opt, step, batches, args, rank, world):
    """Everything an exact resume needs: weights, optimizer, step, data position, every rank's RNGs."""
    rngs = tu.gather_rng_states()  # collective
    meta = {"step": step, "data": batches.position(), "rng": rngs, "world": world, "args": vars(args)}
    return dtu.save(out, model, opt, meta, rank)


def resume(out, model, opt, args, rank, world):
    """(step, data position, RNG states) from the newest usable checkpoint in ``out``, or None."""
    try:
        found = dtu.load(out, model, opt, rank, required=("step", "data", "rng"))
    except tu.CheckpointError as e:
        raise SystemExit(f"--resume: {e}") from None
    if found is None:
        return None
    state, src = found
    data = state["data"]
    if state.get("world", world) != world:  # the per-rank split of each epoch changed
        data = {"epoch": data["epoch"] + (data["batch_in_epoch"] > 0), "batch_in_epoch": 0, "skipped": []}
    if rank == 0:
        print(f"resumed from {src} at step {state['step']} (epoch {data['epoch']}, batch {data['batch_in_epoch']})",
              flush=True)
    return state["step"], data, state["rng"]


def lr_at(step, args, base):
    if step < args.warmup_steps:
        return base * (step + 1) / args.warmup_steps
    t = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return base * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


# ---------------------------------------------------------------- main
def main(argv=None, method: Optional[str] = None):
    args = parse_args(argv, method)
    rank, world, local = dtu.setup()
    last_loss = _train(args, rank, world, local)  # its model, optimizer and data are freed on return
    if dist.is_initialized():
        gc.collect()  # cycles (the data iterator, DDP's hooks) too
        # Torn down together, after the objects that hold the process group are gone: a rank that
        # left early while a peer still tore down its DDP state was seen to hang the peer at exit.
        dist.barrier()
        dist.destroy_process_group()
    return last_loss


def _train(args, rank: int, world: int, local: int) -> float:
    """The training run of :func:`main` (distributed state already set up); the last logged loss."""
    recipe = RECIPES[args.method]
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(args.seed)  # the same initial weights on every rank (FSDP2 does not broadcast them)

    model = build_model(args, recipe).to(device)
    img = model.img_size
    masks = recipe.masks(model) if recipe.masks is not None else None
    torch.manual_seed(args.seed + rank)  # per-rank streams from here on (MixMIM's masks, drop path)
    base_lr = args.lr * args.batch_size * world / 256
    model = dtu.wrap(model, fsdp=args.fsdp, world=world, device=device, units=SHARD_UNITS)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.ndim > 1 and "mask_token" not in n]
    no_decay = [p for n, p in named if p.ndim <= 1 or "mask_token" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=base_lr, betas=(0.9, 0.95))
    fwd = torch.compile(model) if args.compile else model

    os.makedirs(args.out, exist_ok=True)
    step, position, rngs = 0, {}, None
    resumed = resume(args.out, model, opt, args, rank, world) if args.resume else None
    if resumed is not None:
        step, position, rngs = resumed

    use_amp = (device.type == "cuda" and not args.no_amp) or (device.type == "cpu" and args.cpu_amp)
    loader, sampler = make_loader(args, img, rank, world, masks)
    batches = tu.EpochBatches(loader, sampler, **position)
    data = iter(batches)
    if rngs is not None:  # last, right before the loop: the next draw is the one the saved run made next
        tu.restore_rng_states(rngs, rank, world)
    loss_log = open(args.loss_log, "a") if args.loss_log and rank == 0 else None
    try:
        from tqdm import tqdm

        bar = tqdm(total=args.steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    except ImportError:  # plain log lines instead
        bar = None
    t0, seen, last_loss, ckpt = time.perf_counter(), 0, float("nan"), None
    model.train()
    while step < args.steps:
        imgs, batch_masks = next(data)
        imgs = imgs.to(device, non_blocking=True)
        batch_masks = [m.to(device, non_blocking=True) for m in batch_masks]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args, base_lr)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = recipe.step(fwd, imgs, batch_masks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        seen += imgs.shape[0] * world
        if loss_log is not None:
            loss_log.write(f"{step} {loss.item().hex()}\n")
            loss_log.flush()
        if step % args.log_every == 0 or step == args.steps:
            last_loss = loss.item()  # the only host sync per log interval
            if not math.isfinite(last_loss):
                raise RuntimeError(f"loss is {last_loss} at step {step}")
            ips = seen / (time.perf_counter() - t0)
            msg = dict(loss=f"{last_loss:.4f}", img_s=f"{ips:.1f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
            if bar is not None:
                bar.set_postfix(msg)
            elif rank == 0:
                print(f"step {step}/{args.steps} " + " ".join(f"{k}={v}" for k, v in msg.items()), flush=True)
            t0, seen = time.perf_counter(), 0
        if bar is not None:
            bar.update(1)
        if step % args.save_every == 0 or step == args.steps:
            ckpt = save(args.out, model, opt, step, batches, args, rank, world)
        if step == args.kill_after_step:  # a real crash at a chosen step (tests)
            if dist.is_initialized():
                # Every rank at the same point with no collective in flight: a rank killed mid-allreduce
                # would leave its peer waiting forever (an orphan holding the launcher's pipes).
                dist.barrier()
            os.kill(os.getpid(), signal.SIGKILL)
    if bar is not None:
        bar.close()
    skipped = batches.finish()
    if loss_log is not None:
        loss_log.close()
    if args.dump_params:  # tests: every rank's view of the full parameters
        full = dtu.full_model_state(model)  # collective when sharded
        torch.save(full, f"{args.dump_params}.rank{rank}")
    if rank == 0:
        print(f"done: step {step} loss {last_loss:.4f} checkpoint {ckpt} (skipped {skipped} unreadable sample(s) "
              f"over the run)", flush=True)
    return last_loss


if __name__ == "__main__":
    main()

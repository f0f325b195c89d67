#!/usr/bin/env python
"""MixMIM pretraining with mixkernels.

Single process:   python examples/pretrain_mixmim.py --data /path/to/imagenet/train --model mixmim_base
Synthetic smoke:  python examples/pretrain_mixmim.py --synthetic --model mixmim_tiny --steps 10 --batch-size 8
Several GPUs:     torchrun --nproc_per_node 8 examples/pretrain_mixmim.py --data ... [--fsdp]

Data: a folder tree of images (e.g. ImageNet's train/; labels are ignored) or ``--synthetic``
random images. Unreadable files (truncated, empty, not images, over ``--max-image-pixels``)
are skipped, replaced by the next good image (every rank keeps the same number of batches)
and listed at the end of each epoch; every image mode is converted to RGB.
bf16 autocast on CUDA (``--no-amp`` to disable, ``--cpu-amp`` to also use it on the CPU),
AdamW with warm-up + cosine schedule, a progress line with images/s and loss.

Checkpoints every ``--save-every`` steps and at the end, atomically (``<out>/checkpoint.pt``,
the one before kept as ``checkpoint.pt.prev``); ``--resume`` continues exactly where the
checkpoint was taken (RNG states and the position inside the epoch are saved: on the CPU an
interrupted and resumed run gives the same losses bit for bit as an uninterrupted one),
falls back to the previous checkpoint when the latest is damaged, and loads weights only.
Under torchrun the model is wrapped in DDP, or sharded with FSDP2
(``torch.distributed.fsdp.fully_shard``) when ``--fsdp`` is given.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mixkernels import models  # noqa: E402
from mixkernels import train_utils as tu  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mixmim_base", choices=["mixmim_tiny", "mixmim_base", "mixmim_large", "mixmim_huge"])
    p.add_argument("--data", default=None, help="image folder (class subfolders)")
    p.add_argument("--synthetic", action="store_true", help="random images instead of --data")
    p.add_argument("--img-size", type=int, default=None, help="default: the model's (224; 32 for tiny)")
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--steps", type=int, default=1000, help="total optimizer steps")
    p.add_argument("--lr", type=float, default=1.5e-4, help="base lr for batch 256 (scaled linearly)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--mask-ratio", type=float, default=0.5)
    p.add_argument("--backend", default=None, help="force one mixkernels backend (default: automatic)")
    p.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on CUDA")
    p.add_argument("--cpu-amp", action="store_true", help="bf16 autocast on the CPU too")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP (under torchrun)")
    p.add_argument("--out", default="./mixmim_out", help="checkpoint directory")
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt if present")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--loss-log", default=None, help="append 'step loss' (exact, float.hex) of every step to this file")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--max-image-pixels", type=int, default=tu.data.DEFAULT_MAX_PIXELS,
                   help="skip images with more pixels (decompression-bomb guard)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kill-after-step", type=int, default=None, help=argparse.SUPPRESS)  # tests: SIGKILL itself
    a = p.parse_args(argv)
    if not a.synthetic and a.data is None:
        p.error("give --data DIR or --synthetic")
    return a


# ---------------------------------------------------------------- distributed setup
def setup_distributed():
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 1:
        return 0, 1, 0
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank, world, local


def wrap_model(model, args, world, device):
    if world == 1:
        return model
    if args.fsdp:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard
        for layer in model.layers:
            for blk in layer.blocks:
                fully_shard(blk)
        for blk in model.decoder_blocks:
            fully_shard(blk)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


# ---------------------------------------------------------------- data
class Synthetic(torch.utils.data.Dataset):
    def __init__(self, n, img):
        self.n, self.img = n, img

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.randn(3, self.img, self.img, generator=g), 0


def make_loader(args, img, rank, world):
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
        tu.SeededSamples(ds, seed=args.seed), batch_size=args.batch_size, sampler=sampler, drop_last=True,
        collate_fn=tu.collate, num_workers=workers, pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        generator=torch.Generator().manual_seed(args.seed),  # worker seeds: never drawn from the global RNG
    )
    return loader, sampler


# ---------------------------------------------------------------- checkpoints
def state_dicts(model, opt, args):
    if args.fsdp and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    raw = model.module if hasattr(model, "module") else model
    return raw.state_dict(), opt.state_dict()


def load_state_dicts(model, opt, msd, osd, args):
    if args.fsdp and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd,
                       options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
        return
    raw = model.module if hasattr(model, "module") else model
    raw.load_state_dict(msd)
    opt.load_state_dict(osd)


CKPT_KEYS = ("model", "optimizer", "step", "data", "rng")


def save(path, model, opt, step, batches, args, rank, world):
    """Everything an exact resume needs: weights, optimizer, step, data position, every rank's RNGs."""
    msd, osd = state_dicts(model, opt, args)
    rngs = tu.gather_rng_states()  # collective
    if rank == 0:
        tu.save_checkpoint(path, {"model": msd, "optimizer": osd, "step": step, "data": batches.position(),
                                  "rng": rngs, "world": world, "args": vars(args)})
    if dist.is_initialized():
        dist.barrier()


def resume(path, model, opt, args, rank, world):
    """(step, data position, RNG states) from the checkpoint at ``path`` (or its fallback), or None."""
    try:
        found = tu.load_checkpoint(path, required=CKPT_KEYS)
    except tu.CheckpointError as e:
        raise SystemExit(f"--resume: {e}") from None
    if found is None:
        return None
    state, src = found
    load_state_dicts(model, opt, state["model"], state["optimizer"], args)
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
def main(argv=None):
    args = parse_args(argv)
    rank, world, local = setup_distributed()
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(args.seed + rank)

    kw = dict(mask_ratio=args.mask_ratio, backend=args.backend)
    if args.img_size:
        kw["img_size"] = args.img_size
    model = getattr(models, args.model)(**kw).to(device)
    img = model.img_size
    base_lr = args.lr * args.batch_size * world / 256
    model = wrap_model(model, args, world, device)  # before the optimizer: FSDP2 swaps in sharded params
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.ndim > 1 and "mask_token" not in n]
    no_decay = [p for n, p in named if p.ndim <= 1 or "mask_token" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=base_lr, betas=(0.9, 0.95))
    fwd = torch.compile(model) if args.compile else model

    os.makedirs(args.out, exist_ok=True)
    ckpt = os.path.join(args.out, "checkpoint.pt")
    step, position, rngs = 0, {}, None
    resumed = resume(ckpt, model, opt, args, rank, world) if args.resume else None
    if resumed is not None:
        step, position, rngs = resumed

    use_amp = (device.type == "cuda" and not args.no_amp) or (device.type == "cpu" and args.cpu_amp)
    loader, sampler = make_loader(args, img, rank, world)
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
    t0, seen, last_loss = time.perf_counter(), 0, float("nan")
    model.train()
    while step < args.steps:
        imgs, _ = next(data)
        imgs = imgs.to(device, non_blocking=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args, base_lr)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss, _, _ = fwd(imgs)
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
            save(ckpt, model, opt, step, batches, args, rank, world)
        if step == args.kill_after_step:
            os.kill(os.getpid(), signal.SIGKILL)  # a real crash at a chosen step (tests)
    if bar is not None:
        bar.close()
    skipped = batches.finish()
    if loss_log is not None:
        loss_log.close()
    if rank == 0:
        print(f"done: step {step} loss {last_loss:.4f} checkpoint {ckpt} (skipped {skipped} unreadable sample(s) "
              f"over the run)", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return last_loss


if __name__ == "__main__":
    main()

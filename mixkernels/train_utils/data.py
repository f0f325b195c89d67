"""Data loading for pretraining that resumes exactly and survives bad files.

* :class:`ResumableSampler` gives each rank its share of a per-epoch permutation that is a
  pure function of ``(seed, epoch)`` and can start at any position inside the epoch, so a
  resumed run sees exactly the batches the uninterrupted run would have seen. It yields
  ``(epoch, index)`` keys.
* :class:`SeededSamples` wraps a map-style dataset and loads sample ``index`` of ``epoch`` with
  torch/``random``/numpy seeded from ``(seed, epoch, index)`` (in a forked RNG state, so the
  training process's generators are untouched): random augmentations are then the same
  whichever worker loads the sample and whether or not the run was interrupted. A sample that
  cannot be loaded (unreadable, undecodable, too large, a transform that fails) is replaced by
  the next good one and reported, so every rank still gets the same number of batches (a DDP
  run never stalls on one rank's bad file). Use :func:`collate` as the DataLoader's
  ``collate_fn``: it returns ``(batch, skipped)`` with the ``(path, reason)`` pairs skipped
  while loading that batch.
* :class:`ImageFiles` lists the images of a folder tree and decodes them defensively:
  fully decoded at load (truncated files fail there), any mode converted to RGB, a pixel cap
  checked from the header before decoding (decompression bombs).
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import warnings
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset, Sampler, default_collate

__all__ = ["ResumableSampler", "SeededSamples", "ImageFiles", "BadSample", "EpochBatches", "collate", "load_rgb",
           "IMAGE_EXTENSIONS", "DEFAULT_MAX_PIXELS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own MAX_IMAGE_PIXELS default (~ 9459 x 9459)


class ResumableSampler(Sampler):
    """One rank's ``(epoch, index)`` keys of a dataset of ``n`` samples.

    Epoch ``e`` is a permutation of ``range(n)`` drawn from a generator seeded with
    ``seed + e`` (identity without ``shuffle``), cut to ``world * (n // world)`` samples (as
    ``DistributedSampler(drop_last=True)``; every rank gets the same count); rank ``r`` takes
    positions ``r, r + world, ...``. :meth:`set_epoch` chooses the epoch and the number of
    this rank's samples already consumed in it.
    """

    def __init__(self, n: int, *, rank: int = 0, world: int = 1, shuffle: bool = True, seed: int = 0):
        if n < world:
            raise ValueError(f"a dataset of {n} samples cannot be split over {world} ranks")
        self.n, self.rank, self.world, self.shuffle, self.seed = n, rank, world, shuffle, seed
        self.per_rank = n // world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.per_rank:
            raise ValueError(f"start must be in [0, {self.per_rank}], got {start}")
        self.epoch, self.start = int(epoch), int(start)

    def indices(self, epoch: int) -> List[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        return perm[: self.per_rank * self.world][self.rank :: self.world]

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        e = self.epoch
        return iter([(e, i) for i in self.indices(e)[self.start :]])

    def __len__(self) -> int:
        return self.per_rank - self.start


class BadSample(Exception):
    """A sample that cannot be used; the message says why."""


def _seed_of(seed: int, epoch: int, index: int) -> int:
    h = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1  # < 2**63


@contextlib.contextmanager
def _seeded(value: int):
    """Global torch (CPU), ``random`` and numpy generators seeded with ``value``, restored afterwards."""
    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(value)
        random.seed(value)
        np.random.seed(value % 2**32)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


class SeededSamples(Dataset):
    """``dataset[index]`` loaded with RNGs seeded from ``(seed, epoch, index)``; bad samples replaced.

    Keys are ``(epoch, index)`` (see :class:`ResumableSampler`) or plain indices (epoch 0).
    Returns ``(sample, skipped)``: ``skipped`` lists ``(path, reason)`` of the samples tried
    and replaced (the next indices, cyclically) before a good one was found. After
    ``max_tries`` bad samples in a row it raises :class:`BadSample`.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, max_tries: int = 50):
        self.dataset, self.seed, self.max_tries = dataset, seed, max_tries

    def __len__(self) -> int:
        return len(self.dataset)

    def _describe(self, index: int) -> str:
        path = getattr(self.dataset, "path", None)
        return path(index) if callable(path) else f"sample {index}"

    def __getitem__(self, key) -> Tuple[Any, List[Tuple[str, str]]]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        n = len(self.dataset)
        skipped: List[Tuple[str, str]] = []
        for k in range(min(self.max_tries, n)):
            i = (index + k) % n
            try:
                with _seeded(_seed_of(self.seed, epoch, i)):
                    return self.dataset[i], skipped
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # noqa: BLE001 - any failure of one sample is reported, not fatal
                skipped.append((self._describe(i), f"{type(e).__name__}: {e}"))
        raise BadSample(f"{len(skipped)} consecutive samples could not be loaded, starting at "
                        f"{skipped[0][0] if skipped else index}: " + "; ".join(f"{p} ({r})" for p, r in skipped[:5]))


def collate(items: Sequence[Tuple[Any, List[Tuple[str, str]]]]):
    """DataLoader ``collate_fn`` for :class:`SeededSamples`: ``(default_collate(samples), skipped)``."""
    return default_collate([s for s, _ in items]), [r for _, rs in items for r in rs]


class EpochBatches:
    """Endless batches of a DataLoader over a :class:`ResumableSampler`, from any position.

    ``position()`` is what to checkpoint after a batch has been used (epoch, batches consumed
    in it, files skipped so far in it); ``EpochBatches(loader, sampler, **position)`` resumes
    with the next batch. Files skipped by :class:`SeededSamples` are reported once per epoch
    through ``report(epoch, skipped, partial)`` (summed over ranks under torch.distributed,
    so call it on every rank), and :meth:`finish` reports the epoch a run ends in.
    """

    def __init__(self, loader, sampler: ResumableSampler, epoch: int = 0, batch_in_epoch: int = 0,
                 skipped: Optional[List[Tuple[str, str]]] = None, report: Optional[Callable] = None):
        self.loader, self.sampler = loader, sampler
        self.epoch, self.batch_in_epoch = int(epoch), int(batch_in_epoch)
        self.skipped: List[Tuple[str, str]] = [tuple(s) for s in (skipped or [])]
        self.report = report or report_skipped
        self.total_skipped = 0

    def position(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "skipped": [list(s) for s in self.skipped]}

    def _end_epoch(self, partial: bool) -> None:
        self.total_skipped += self.report(self.epoch, self.skipped, partial)
        self.skipped = []

    def __iter__(self):
        bs = self.loader.batch_size
        while True:
            self.sampler.set_epoch(self.epoch, min(self.batch_in_epoch * bs, self.sampler.per_rank))
            for batch, skipped in self.loader:
                self.skipped += skipped
                self.batch_in_epoch += 1
                yield batch
            self._end_epoch(partial=False)
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def finish(self) -> int:
        """Report the current (partial) epoch; returns the files skipped over the whole run."""
        if self.batch_in_epoch:
            self._end_epoch(partial=self.batch_in_epoch < self.sampler.per_rank // self.loader.batch_size)
        return self.total_skipped


def report_skipped(epoch: int, skipped: List[Tuple[str, str]], partial: bool = False, log=print) -> int:
    """Print (on rank 0) the files skipped in an epoch over all ranks; returns how many (distinct)."""
    import torch.distributed as dist

    every = [skipped]
    if dist.is_available() and dist.is_initialized():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, list(skipped))
    found = list(dict.fromkeys(tuple(s) for part in every for s in part))  # a file tried twice counts once
    rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    if found and rank0:
        what = "so far in" if partial else "in"
        lines = "\n".join(f"  {p}: {r}" for p, r in found[:20])
        more = f"\n  ... and {len(found) - 20} more" if len(found) > 20 else ""
        log(f"data: skipped {len(found)} unreadable sample(s) {what} epoch {epoch} (replaced by the next good ones):\n"
            f"{lines}{more}", flush=True)
    return len(found)


# ---------------------------------------------------------------- images
def _to_rgb(img):
    """Any PIL mode -> RGB. Alpha is dropped (as ``convert('RGB')``); 16/32-bit and float
    grayscale are scaled to 8 bits by their range instead of being clipped at 255."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        import numpy as np

        a = np.asarray(img, dtype=np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise BadSample(f"{img.mode} image holds non-finite values")
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        img = Image.fromarray(a.round().astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # palette transparency: through RGBA, as PIL recommends
    return img.convert("RGB")


def load_rgb(path: str, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS):
    """Open, fully decode and convert one image to RGB.

    Raises :class:`BadSample` (or PIL's/the OS's error) for files that are empty, not images,
    truncated or corrupted, and for images over ``max_pixels`` (checked from the header,
    before decoding: a decompression bomb never allocates its pixels).
    """
    from PIL import Image

    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise BadSample("empty file (0 bytes)")
        try:
            with warnings.catch_warnings():  # our cap below is the check that counts
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(f)
        except Image.DecompressionBombError as e:
            raise BadSample(f"{e} (decompression-bomb guard)") from None
        with img:
            w, h = img.size
            if max_pixels is not None and w * h > max_pixels:
                raise BadSample(f"{w}x{h} = {w * h} pixels exceeds the cap of {max_pixels} "
                                f"(decompression-bomb guard; raise the cap if the image is legitimate)")
            img.load()  # decode now: a truncated file fails here, not later in a transform
            return _to_rgb(img).copy()


class ImageFiles(Dataset):
    """Every image under ``root`` (recursively, sorted; labels ignored) as ``(transform(rgb), 0)``.

    Files are chosen by extension (:data:`IMAGE_EXTENSIONS`); what they hold is only found out
    at load time, so bad files surface as exceptions for :class:`SeededSamples` to skip.
    """

    def __init__(self, root: str, transform: Optional[Callable] = None,
                 max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, extensions: Sequence[str] = IMAGE_EXTENSIONS):
        self.root, self.transform, self.max_pixels = root, transform, max_pixels
        exts = tuple(e.lower() for e in extensions)
        self.files: List[str] = []
        for d, dirs, names in os.walk(root, followlinks=True):
            dirs.sort()
            self.files += [os.path.join(d, n) for n in sorted(names) if n.lower().endswith(exts)]
        if not self.files:
            raise ValueError(f"no image files ({', '.join(exts)}) under {root!r}")

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> str:
        return self.files[index]

    def __getitem__(self, index: int):
        img = load_rgb(self.files[index], self.max_pixels)
        return (self.transform(img) if self.transform is not None else img), 0

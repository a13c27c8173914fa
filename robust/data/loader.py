"""The batch loader: the training set as whole uint8 tensors on the device, augmented on whole batches.

Random crop and flip run on whole batches (no DataLoader, no per-image PIL work). Your own data
may instead stream from disk (:mod:`robust.data.lazy`): the loader then reads each batch of
indices through DataLoader workers and augments it exactly as the in-memory path does, with the
same random draws, so both give the same batches. ``split_train_val`` draws a run's validation split.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Iterator

import torch

from robust.data.lazy import read_batches
from robust.data.types import ImageData
import torch.nn.functional as F


def split_train_val(data: ImageData, val_fraction: float, seed: int, limit: int | None = None,
                    val_limit: int | None = None) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
    """A run's (train, validation) tensors: a seeded ``val_fraction`` of the first ``limit`` training examples.

    Validation is drawn from the limited set, so a quick ``--limit`` run validates in proportion
    to what it trains on; ``val_limit`` caps the validation part further. Lazy (streamed) image
    sets index the same way and stay lazy.
    """
    x, y = (data.train_x, data.train_y) if not limit else (data.train_x[:limit], data.train_y[:limit])
    if val_fraction <= 0:
        return (x, y), None
    train_idx, val_idx = split_indices(len(y), val_fraction, seed, val_limit)
    return (x[train_idx], y[train_idx]), (x[val_idx], y[val_idx])


def split_indices(n: int, val_fraction: float, seed: int, val_limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices into the first ``n`` training examples, as :func:`split_train_val` draws them
    (so a run's validation images can be found again from its seed, fraction and limits)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(n * val_fraction)))
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    if val_limit:
        val_idx = val_idx[:val_limit]
    return train_idx, val_idx


RESIZED_CROP_FROM = 128  # images at least this large (shorter side) get random-resized crops


RESIZED_CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop defaults: area fraction, aspect ratio


RESIZED_CROP_RATIO = (3 / 4, 4 / 3)


def augmentation_for(height: int, width: int) -> dict:
    """The augmentation for an image size: padded random crops with padding 1/8 of the shorter side
    (4 pixels at 28-32, 8 at 64), random-resized crops from :data:`RESIZED_CROP_FROM` pixels on."""
    side = min(int(height), int(width))
    if side >= RESIZED_CROP_FROM:
        return {"pad": 0, "resized_crop": True}
    return {"pad": max(1, int(side / 8 + 0.5)), "resized_crop": False}


def to_float(x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 images -> float in [0, 1] (float images pass through)."""
    out = x.float().div_(255) if x.dtype == torch.uint8 else x
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def crop_at(padded: torch.Tensor, size: tuple[int, int], dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """The ``size`` crop at offsets (dy[i], dx[i]) of each image of a padded batch, as one gather."""
    b, c, hp, wp = padded.shape
    h, w = size
    dy, dx = dy.to(padded.device), dx.to(padded.device)
    rows = (dy[:, None] + torch.arange(h, device=padded.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=padded.device))[:, None, None, :]
    batch = torch.arange(b, device=padded.device)[:, None, None, None]
    chans = torch.arange(c, device=padded.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def random_crop(padded: torch.Tensor, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """One random ``size`` crop per image of an already padded batch, done as one gather."""
    b, _, hp, wp = padded.shape
    dy = torch.randint(0, hp - size[0] + 1, (b,), generator=generator)
    dx = torch.randint(0, wp - size[1] + 1, (b,), generator=generator)
    return crop_at(padded, size, dy, dx)


def flip_where(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Images with ``mask`` set flipped horizontally."""
    return torch.where(mask.to(x.device)[:, None, None, None], x.flip(-1), x)


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image horizontally with probability 1/2."""
    return flip_where(x, torch.rand(x.shape[0], generator=generator) < 0.5)


def draw_resized_crops(b: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """(b, 4) boxes (top, left, h, w) in pixels: area fraction and log aspect ratio uniform as in
    torchvision's RandomResizedCrop, sides clamped to the image (instead of its ten retries)."""
    area = torch.empty(b).uniform_(*RESIZED_CROP_SCALE, generator=generator) * height * width
    log_lo, log_hi = (torch.tensor(r).log().item() for r in RESIZED_CROP_RATIO)
    ratio = torch.empty(b).uniform_(log_lo, log_hi, generator=generator).exp()
    w = (area * ratio).sqrt().clamp(max=width)
    h = (area / ratio).sqrt().clamp(max=height)
    top = torch.rand(b, generator=generator) * (height - h)
    left = torch.rand(b, generator=generator) * (width - w)
    return torch.stack([top, left, h, w], 1)


def resized_crop_at(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each image's box resized (bilinear) back to the image size: one batched grid_sample."""

    b, _, height, width = x.shape
    top, left, h, w = boxes.to(device=x.device, dtype=torch.float32).unbind(1)
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1] = w / width, h / height
    theta[:, 0, 2] = (left + w / 2) / width * 2 - 1  # box centre in [-1, 1] (align_corners=False)
    theta[:, 1, 2] = (top + h / 2) / height * 2 - 1
    grid = F.affine_grid(theta, [b, 1, height, width], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@dataclass(frozen=True)
class Augmentation:
    """The random changes of each training batch: a horizontal flip of half the images, and either a random
    crop of the images padded by ``pad`` pixels (0: none) or, with ``resized_crop``, a random-resized crop."""

    flip: bool
    pad: int = 4
    resized_crop: bool = False

    @classmethod
    def of(cls, owner: str, options: dict[str, Any]) -> "Augmentation":
        """The augmentation ``owner``'s keyword ``options`` name; TypeError on a keyword it does not take."""
        names = [f.name for f in fields(cls)]
        unknown = [k for k in options if k not in names]
        if unknown:
            raise TypeError(f"{owner}() got an unexpected keyword argument {unknown[0]!r}; "
                            f"its augmentation options are {', '.join(names)}")
        if "flip" not in options:
            raise TypeError(f"{owner}() missing required keyword argument: 'flip'")
        return cls(**options)


class BatchLoader:
    """Shuffled, augmented batches from images on the device or read from disk.

    ``x`` is a uint8 tensor (already on the device) or :class:`robust.data.lazy.LazyImages`, whose
    batches ``workers`` DataLoader processes read (pinned for CUDA, prefetched) while the device
    trains. Either way the permutation and every augmentation draw come from one generator seeded
    by ``seed`` and the epoch, in the same order, and the augmentation runs on whole batches on
    the device: the two give the same batches, and a resumed run sees exactly the batches an
    uninterrupted one would. ``set_epoch(epoch, skip=k)`` yields ``(None, None)`` for the first
    ``k`` batches without reading them (their draws are still made).

    ``augment`` shuffles and augments (False: the images in order, unchanged); the keywords ``flip``
    (required), ``pad`` (default 4) and ``resized_crop`` (default False) are the :class:`Augmentation`.
    """

    def __init__(self, x, y: torch.Tensor, batch_size: int, *, augment: bool, seed: int = 0,
                 channels_last: bool = False, device: torch.device | str | None = None, workers: int = 0,
                 **augmentation: Any) -> None:
        self.x, self.y = x, y
        self.batch_size, self.augment = batch_size, augment
        self.augmentation = Augmentation.of(type(self).__name__, augmentation)
        self.seed, self.channels_last = seed, channels_last
        self.streamed = not isinstance(x, torch.Tensor)
        self.device = torch.device(device) if device is not None else (y.device if self.streamed else x.device)
        self.workers = workers
        self.epoch, self.skip = 0, 0
        self._epoch_batches = None  # the latest pass (a generator), for close()

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _indices(self, generator: torch.Generator) -> torch.Tensor:
        n = len(self.y)
        return torch.randperm(n, generator=generator) if self.augment else torch.arange(n)

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def _draw(self, b: int, generator: torch.Generator) -> dict:
        """One batch's augmentation parameters (drawn whether or not the batch is read)."""
        params = {}
        height, width = self.x.shape[-2:]
        pad = self.augmentation.pad
        if self.augmentation.resized_crop:
            params["boxes"] = draw_resized_crops(b, height, width, generator)
        elif pad:
            params["dy"] = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
            params["dx"] = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        if self.augmentation.flip:
            params["flip"] = torch.rand(b, generator=generator) < 0.5
        return params

    def _apply(self, xb: torch.Tensor, params: dict) -> torch.Tensor:
        if "boxes" in params:
            xb = resized_crop_at(to_float(xb), params["boxes"])
        elif "dy" in params:  # pad the batch, not the dataset: no second, larger copy of the data
            xb = crop_at(F.pad(xb, (self.augmentation.pad,) * 4), xb.shape[-2:], params["dy"], params["dx"])
        if "flip" in params:
            xb = flip_where(xb, params["flip"])
        return xb

    def _pixels(self, batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The uint8 images of each batch, on the device."""
        if not self.streamed:
            sizes = [len(idx) for idx in batches]
            for idx in (torch.cat(batches).to(self.x.device).split(sizes) if batches else []):
                yield self.x[idx]
            return

        pin = self.device.type == "cuda"
        reading = read_batches(self.x, [idx.numpy() for idx in batches], self.workers, pin_memory=pin)
        try:
            for xb in reading:
                yield xb.to(self.device, non_blocking=pin)
        finally:
            reading.close()  # stops the workers

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._epoch_batches = self._batches()
        return self._epoch_batches

    def close(self) -> None:
        """Stop the latest pass: a streamed one's reading workers end now (the trainer does it on any exit)."""
        running, self._epoch_batches = self._epoch_batches, None
        if running is not None:
            running.close()

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = self._indices(generator)
        batches = [order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(len(self))]
        drawn = [self._draw(len(idx), generator) if self.augment else {} for idx in batches]  # the same draws, in order
        skip = min(self.skip, len(batches))
        pixels = self._pixels(batches[skip:])
        labels, params = self._on_device(batches, drawn)
        try:
            for i in range(len(batches)):
                if i < skip:
                    yield None, None
                    continue
                xb = self._apply(next(pixels), params[i])
                yield to_float(xb, self.channels_last), labels[i]
        finally:
            pixels.close()

    def _on_device(self, batches: list[torch.Tensor], drawn: list[dict]) -> tuple[list[torch.Tensor], list[dict]]:
        """Each batch's labels and augmentation draws on the device, copied there once per epoch (a copy per
        batch would block the host at every step on a GPU)."""
        sizes = [len(idx) for idx in batches]
        labels = list(self.y[torch.cat(batches).to(self.y.device)].split(sizes)) if batches else []
        params: list[dict] = [{} for _ in batches]
        for key in drawn[0] if drawn else ():
            for i, value in enumerate(torch.cat([d[key] for d in drawn]).to(self.device).split(sizes)):
                params[i][key] = value
        return labels, params

"""Batches mixed from two pools at a fixed share: the labelled set and extra data (``--extra-data``).

Every batch holds ``batch_size - k`` labelled and ``k = round(batch_size * extra_fraction)`` extra
examples, shuffled together (so each DDP rank's rows mix both pools). Each pool is an endless stream
of its own permutations: pass ``j`` over pool ``p`` is ``randperm(n_p)`` from a generator seeded by
(seed, p, j), so every example of a pool is visited once per pass, and batch ``g`` of the run
(counted over epochs) holds stream positions ``[g k_p, (g + 1) k_p)`` of each pool. Where a run
stands is therefore (epoch, batch) alone, and a resumed run draws exactly the batches an
uninterrupted one would. An epoch is ``epoch_size`` examples, or by default one pass over the
labelled pool (as Carmon et al.'s semi-supervised sampler counts it). The augmentation is the
labelled set's, drawn as :class:`~robust.data.loader.BatchLoader` draws it.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from robust.data.extra import ExtraData
from robust.data.lazy import LazyImages
from robust.data.loader import BatchLoader, to_float


def pool_seed(seed: int, pool: int, epoch_pass: int) -> int:
    """The seed of pass ``epoch_pass`` over pool ``pool`` (distinct for every triple)."""
    return (seed * 1_000_003 + epoch_pass) * 2 + pool


class PoolStream:
    """Positions of an endless stream of a pool's permutations, read ``count`` at a time."""

    def __init__(self, size: int, pool: int, seed: int) -> None:
        self.size, self.pool, self.seed = size, pool, seed
        self._perms: dict[int, torch.Tensor] = {}

    def permutation(self, epoch_pass: int) -> torch.Tensor:
        if epoch_pass not in self._perms:
            if len(self._perms) > 2:  # a batch spans at most a few passes; keep the latest ones
                self._perms.pop(min(self._perms))
            generator = torch.Generator().manual_seed(pool_seed(self.seed, self.pool, epoch_pass))
            self._perms[epoch_pass] = torch.randperm(self.size, generator=generator)
        return self._perms[epoch_pass]

    def indices(self, start: int, count: int) -> torch.Tensor:
        """The pool indices at stream positions ``start .. start + count - 1``."""
        positions = torch.arange(start, start + count)
        passes, offsets = positions // self.size, positions % self.size
        out = torch.empty(count, dtype=torch.long)
        for p in passes.unique().tolist():
            here = passes == p
            out[here] = self.permutation(p)[offsets[here]]
        return out


class MixedBatchLoader(BatchLoader):
    """Shuffled, augmented batches of a fixed size from the labelled set and an :class:`ExtraData` pool.

    The interface of :class:`BatchLoader` (``set_epoch(epoch, skip)``, ``len``, iteration,
    ``close``; ``x``/``y`` are the labelled pool). Labels come as int64 (B,) when both pools have
    hard labels, else as float (B, classes) probabilities (hard labels one-hot).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, extra: ExtraData, batch_size: int, *, extra_fraction: float,
                 num_classes: int, epoch_size: int | None = None, **kwargs) -> None:
        super().__init__(x, y, batch_size, **kwargs)
        if self.streamed:
            raise ValueError("MixedBatchLoader takes the labelled images in memory")
        self.extra, self.num_classes = extra, num_classes
        self.extra_count = int(round(batch_size * extra_fraction))
        self.labelled_count = batch_size - self.extra_count
        self.epoch_size = epoch_size
        self.streams = (PoolStream(len(y), 0, self.seed), PoolStream(len(extra), 1, self.seed))
        self.soft = extra.soft

    def __len__(self) -> int:
        if self.epoch_size:
            return -(-self.epoch_size // self.batch_size)
        if self.labelled_count:
            return -(-len(self.y) // self.labelled_count)
        return -(-len(self.extra) // self.batch_size)

    def batch_indices(self, global_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(labelled indices, extra indices) of batch ``global_batch`` of the run."""
        counts = (self.labelled_count, self.extra_count)
        return tuple(s.indices(global_batch * k, k) for s, k in zip(self.streams, counts))

    def _targets(self, labels: torch.Tensor) -> torch.Tensor:
        if not self.soft or labels.dim() == 2:
            return labels.float() if self.soft else labels
        return F.one_hot(labels, self.num_classes).float()

    def _extra_pixels(self, idx: torch.Tensor) -> torch.Tensor:
        if isinstance(self.extra.x, LazyImages):
            return self.extra.x.read(idx.numpy()).to(self.device)
        return self.extra.x[idx].to(self.device)

    def _draws_on_device(self, draws: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
        """The epoch's in-batch shuffles and augmentation draws on the device, copied there once per epoch
        (a copy per batch would block the host at every step on a GPU)."""
        if not draws:
            return torch.empty(0, self.batch_size, dtype=torch.long), []
        mixes = torch.stack([mix for mix, _ in draws]).to(self.device)
        params: list[dict] = [{} for _ in draws]
        for key in draws[0][1]:
            for i, value in enumerate(torch.stack([d[key] for _, d in draws]).to(self.device).unbind(0)):
                params[i][key] = value
        return mixes, params

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        steps = len(self)
        draws = []
        for _ in range(steps):  # every draw of the epoch, in order, whether or not a batch is read
            mix = torch.randperm(self.batch_size, generator=generator)
            draws.append((mix, self._draw(self.batch_size, generator)))
        mixes, params = self._draws_on_device(draws)
        skip = min(self.skip, steps)
        for i in range(steps):
            if i < skip:
                yield None, None
                continue
            mix = mixes[i]
            labelled, extra = self.batch_indices(self.epoch * steps + i)
            pixels = torch.cat([self.x[labelled.to(self.x.device)], self._extra_pixels(extra)])
            labels = torch.cat([self._targets(self.y[labelled.to(self.y.device)]),
                                self._targets(self.extra.y[extra]).to(self.y.device)])
            xb = self._apply(pixels[mix], params[i])
            yield to_float(xb, self.channels_last), labels[mix.to(labels.device)]

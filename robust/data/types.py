"""What a dataset is: :class:`ImageData` (uint8 images, int64 labels, its :class:`DatasetInfo`) and the built-in sets' facts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from robust.errors import DataError

# name: (classes, channels, mean, std, horizontal flip is a valid augmentation)
DATASET_INFO = {
    "cifar10": (10, 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
    "cifar100": (100, 3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True),
    "svhn": (10, 3, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), False),
    "mnist": (10, 1, (0.1307,), (0.3081,), False),
    "fashion-mnist": (10, 1, (0.2860,), (0.3530,), True),
}


CUSTOM_DATASETS = ("imagefolder", "tensors")


class DatasetInfo(NamedTuple):
    """What a model needs to know about a dataset."""

    num_classes: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool  # horizontal flip is a valid augmentation
    classes: tuple[str, ...] | None = None


@dataclass
class ImageData:
    """A dataset: images uint8 (N, C, H, W) as tensors (or :class:`robust.data.lazy.LazyImages` when
    streamed), labels int64 (N,).

    ``info`` defaults to the built-in dataset's; ``source`` says where custom data came from (it
    is recorded in checkpoints, so evaluation finds the same data).
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    info: DatasetInfo | None = None
    source: dict | None = None

    def __post_init__(self) -> None:
        if self.info is None:
            if self.name not in DATASET_INFO:
                raise DataError(f"ImageData {self.name!r} needs info=DatasetInfo(...): it is not a built-in dataset")
            self.info = DatasetInfo(*DATASET_INFO[self.name])

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def channels(self) -> int:
        return self.info.channels

    @property
    def mean(self) -> tuple[float, ...]:
        return self.info.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.info.std

    @property
    def flip(self) -> bool:
        return self.info.flip

    @property
    def streamed(self) -> bool:
        """True when the training images are read from disk batch by batch."""
        return not isinstance(self.train_x, torch.Tensor)

    def record(self) -> dict:
        """What a checkpoint keeps about the data: enough to find it again, and the input size."""
        return {"dataset": self.name, "input_size": list(self.train_x.shape[1:]), **(self.source or {})}

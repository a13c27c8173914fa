"""What a dataset is: :class:`ImageData` (uint8 images, int64 labels, its :class:`DatasetInfo`), and the registry of
the names --dataset takes (:data:`DATASET_SPECS`, a :class:`DatasetSpec` each: built-in sets are registered in
:mod:`robust.data.builtin`, the custom kinds in :mod:`robust.data.load`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping, NamedTuple

import torch

from robust.attacks.named import Registry, Spec
from robust.errors import DataError


class DatasetInfo(NamedTuple):
    """What a model needs to know about a dataset."""

    num_classes: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool  # horizontal flip is a valid augmentation
    classes: tuple[str, ...] | None = None


@dataclass(frozen=True)
class DatasetSpec(Spec):
    """A name --dataset takes, and every fact of it.

    A built-in set (``custom`` False) has its shape facts (``num_classes``, ``channels``, ``mean``, ``std``, ``flip``),
    its ``class_names`` where known, the files a --data-dir must hold (``expected_files``, with an install ``hint``),
    the ``system_dirs`` looked in first and the ``torchvision`` class that downloads it; ``build(name, folder)``
    reads it from a folder (None when the folder does not hold it). A custom kind (``custom`` True) learns its
    facts from the user's files: ``build(data_dir, image_size, mode, budget, workers)`` reads them, and
    ``expected_files`` says what --data-dir must name.
    """

    num_classes: int = 0
    channels: int = 0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    flip: bool = False
    class_names: tuple[str, ...] | None = None
    expected_files: str = ""
    hint: str = ""
    system_dirs: tuple[str, ...] = ()
    torchvision: str = ""
    custom: bool = False

    @property
    def info(self) -> DatasetInfo:
        """A built-in set's :class:`DatasetInfo`."""
        return DatasetInfo(self.num_classes, self.channels, self.mean, self.std, self.flip, self.class_names)


DATASET_SPECS: Registry[DatasetSpec] = Registry("dataset", DatasetSpec, error=DataError)


def builtin_specs() -> list[DatasetSpec]:
    """The built-in sets' specs, in registration order."""
    return [spec for spec in DATASET_SPECS if not spec.custom]


class BuiltinInfo(Mapping[str, DatasetInfo]):
    """``DATASET_INFO``: built-in name -> :class:`DatasetInfo`, read from the registry on each access (so it is
    complete whichever module imported it first)."""

    def __getitem__(self, name: str) -> DatasetInfo:
        spec = DATASET_SPECS.get(name) if name in DATASET_SPECS else None
        if spec is None or spec.custom:
            raise KeyError(name)
        return spec.info

    def __iter__(self) -> Iterator[str]:
        return iter([spec.name for spec in builtin_specs()])

    def __len__(self) -> int:
        return len(builtin_specs())


DATASET_INFO = BuiltinInfo()


def __getattr__(name: str) -> Any:
    """``CUSTOM_DATASETS``: the custom kinds' names (imagefolder, tensors), registered by :mod:`robust.data.load`."""
    if name == "CUSTOM_DATASETS":
        return tuple(spec.name for spec in DATASET_SPECS if spec.custom)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dataset_class_names(name: object) -> tuple[str, ...] | None:
    """A built-in set's class names in label order, or None (unknown set, or one without names)."""
    return DATASET_SPECS.get(str(name)).class_names if str(name) in DATASET_SPECS else None


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
            self.info = DATASET_INFO[self.name]

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

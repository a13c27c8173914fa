"""Datasets: built-in sets, image folders and tensor files (in memory or streamed), and the batch loader."""

from robust.data.load import DATA_MODES, DATASETS, datasets_help, load_dataset, memory_budget
from robust.data.loader import BatchLoader, split_train_val, to_float
from robust.data.types import CUSTOM_DATASETS, DATASET_INFO, DATASET_SPECS, DatasetInfo, DatasetSpec, ImageData

__all__ = [
    "CUSTOM_DATASETS", "DATASETS", "DATASET_INFO", "DATASET_SPECS", "DATA_MODES", "BatchLoader", "DatasetInfo",
    "DatasetSpec", "ImageData", "datasets_help", "load_dataset", "memory_budget", "split_train_val", "to_float",
]

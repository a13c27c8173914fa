"""Datasets: built-in sets, image folders and tensor files (in memory or streamed), and the batch loader."""

from robust.data.load import DATA_MODES, DATASETS, load_dataset, memory_budget
from robust.data.loader import BatchLoader, split_train_val, to_float
from robust.data.types import CUSTOM_DATASETS, DATASET_INFO, DatasetInfo, ImageData

__all__ = [
    "CUSTOM_DATASETS", "DATASETS", "DATASET_INFO", "DATA_MODES", "BatchLoader", "DatasetInfo", "ImageData",
    "load_dataset", "memory_budget", "split_train_val", "to_float",
]

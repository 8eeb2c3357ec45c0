"""Token data: the indexed file format, samples, blends and per-rank batches."""

from megagpt.data.dataset import (
    BlendedDataset,
    GPTDataset,
    SplitDatasets,
    build_datasets,
    global_sample_indices,
)
from megagpt.data.indexed import (
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    token_dtype,
)

__all__ = [
    "BlendedDataset",
    "GPTDataset",
    "IndexedDataset",
    "IndexedDatasetError",
    "IndexedDatasetWriter",
    "SplitDatasets",
    "build_datasets",
    "global_sample_indices",
    "token_dtype",
]

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
from megagpt.data.settings import check_data_config, parse_data_path, parse_split

__all__ = [
    "BlendedDataset",
    "GPTDataset",
    "IndexedDataset",
    "IndexedDatasetError",
    "IndexedDatasetWriter",
    "SplitDatasets",
    "build_datasets",
    "check_data_config",
    "global_sample_indices",
    "parse_data_path",
    "parse_split",
    "token_dtype",
]

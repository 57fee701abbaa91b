"""Corpora as WebDataset shards: the shard writer/reader and the converters.

    genius.data.shards        ShardWriter, ShardReader / iter_shards, Record, ReadStats, manifest
    genius.data.fashion_mnist Fashion-MNIST (Debian: dataset-fashion-mnist)
    genius.data.openclipart   Openclipart clip art (Debian: openclipart-png, openclipart-svg)
    genius.data.wordnet       WordNet synsets, text only (Debian: wordnet-base)
    genius.data.generic       a folder of images (+ .txt captions) or a Parquet/CSV table

Converters import torch-heavy modules (the encoders' image checks) only when used, so
importing this package is cheap.
"""
from genius.data.shards import (
    MANIFEST_FILE, MissingSourceError, ReadStats, Record, ShardReader, ShardWriter, iter_shards, make_key,
    read_manifest, to_items,
)

__all__ = [
    "MANIFEST_FILE", "MissingSourceError", "ReadStats", "Record", "ShardReader", "ShardWriter", "iter_shards",
    "make_key", "read_manifest", "to_items",
]

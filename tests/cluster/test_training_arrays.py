"""The build's training inputs streamed into memory-mapped arrays (cluster/build/training.py)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.build.training import PAIRS_FILE, open_pair_arrays, prepare_pair_arrays
from genius.idcodec import IdCodec


def _id_table(path, keys, modality, vectors, codes, codec):
    ids = codec.pack(np.asarray(codes))
    pq.write_table(pa.table({
        "key": keys, "modality": modality,
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(vectors, np.float16).ravel()), 2),
        "id": pa.array([bytes(row) for row in ids], pa.binary(codec.width)),
    }), path)


def test_pairs_join_their_targets_first_table_wins_and_unindexed_are_left_out(tmp_path):
    codec = IdCodec(2, 16)
    _id_table(tmp_path / "a.parquet", ["x", "y"], ["image", "text"], [[1, 0], [0, 1]], [[1, 2], [3, 4]], codec)
    # "y" again in a second table (a skipped duplicate): the first table's row is the target.
    _id_table(tmp_path / "b.parquet", ["z", "y"], ["image_text", "image"], [[1, 1], [9, 9]], [[5, 6], [7, 8]], codec)
    pq.write_table(pa.table({
        "query_vector": pa.array([[0.5, 0.5], [1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], pa.list_(pa.float32())),
        "query_modality": ["text", "image", "text", "image_text"],
        "target": ["z", "gone", "y", "x"],
    }), tmp_path / PAIRS_FILE)
    out = tmp_path / "arrays"
    kept = prepare_pair_arrays(tmp_path, [tmp_path / "a.parquet", tmp_path / "b.parquet"], out, codec, True)
    pairs = open_pair_arrays(out)
    assert kept == 3 and isinstance(pairs["query"], np.memmap)
    assert pairs["query"].tolist() == [[0.5, 0.5], [3.0, 4.0], [5.0, 6.0]]
    assert pairs["query_modality"].tolist() == [1, 1, 2]
    assert pairs["target"].astype(float).tolist() == [[1, 1], [0, 1], [1, 0]]
    assert pairs["target_modality"].tolist() == [2, 1, 0]
    assert pairs["codes"].tolist() == [[2, 5, 6], [1, 3, 4], [0, 1, 2]]  # code 0 = the modality
    plain = tmp_path / "plain"
    prepare_pair_arrays(tmp_path, [tmp_path / "a.parquet", tmp_path / "b.parquet"], plain)  # stage 2: no codes
    assert "codes" not in open_pair_arrays(plain)


def test_item_arrays_leave_out_the_rows_the_merge_dropped(tmp_path):
    from cluster.build.training import ITEM_CODES, ITEM_VECTORS, prepare_item_arrays

    codec = IdCodec(2, 16)
    _id_table(tmp_path / "a.parquet", ["x", "y"], ["image", "text"], [[1, 0], [0, 1]], [[1, 2], [3, 4]], codec)
    _id_table(tmp_path / "b.parquet", ["z", "y"], ["image_text", "text"], [[1, 1], [9, 9]], [[5, 6], [7, 8]], codec)
    prepare_item_arrays([tmp_path / "a.parquet", tmp_path / "b.parquet"], 2, 16, True, tmp_path / "items", [[], [1]])
    assert np.load(tmp_path / "items" / ITEM_CODES).tolist() == [[0, 1, 2], [1, 3, 4], [2, 5, 6]]
    assert np.load(tmp_path / "items" / ITEM_VECTORS).astype(float).tolist() == [[1, 0], [0, 1], [1, 1]]

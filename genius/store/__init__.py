"""The index store (format v2): versioned, memory-mapped, checksummed index folders.

    INDEX/CURRENT -> v-<n>/{manifest.json, model/, trie/, items/, vectors/, deletes.npy}

Modules, one concern each: layout (names, CURRENT), manifest (what a version holds, sizes and
sha256), item_table and vector_shards (data by item-number range), publish (staging, atomic
swap, gc), reader (open a version), data_files and model_files (write them), merge (per-shard
ID tables -> partitions, one pure function per partition), update (add, delete, compact),
verify (checksums). `genius.index.GeniusIndex.save/load` use it.
"""
from genius.store.layout import FORMAT_VERSION, IndexFormatError, resolve_version
from genius.store.manifest import Manifest, RangeFile
from genius.store.publish import PublishConflictError, VersionWriter, gc
from genius.store.reader import StoreVersion, open_version

__all__ = [
    "FORMAT_VERSION", "IndexFormatError", "Manifest", "PublishConflictError", "RangeFile", "StoreVersion",
    "VersionWriter", "gc", "open_version", "resolve_version",
]

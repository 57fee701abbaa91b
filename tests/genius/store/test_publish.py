"""Versions: publish beside the old one, swap CURRENT atomically, keep readers on their version,
survive a writer killed at any point."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from genius.index import GeniusIndex
from genius.store import IndexFormatError, PublishConflictError, VersionWriter, gc
from genius.store.layout import CURRENT, list_versions, read_current
from genius.store.reader import open_version
from genius.store.verify import verify_version


def test_save_publishes_numbered_versions_and_current(fitted, tmp_path):
    root = tmp_path / "idx"
    first = fitted.save(root)
    second = fitted.save(root)
    assert (first.name, second.name) == ("v-0", "v-1")
    assert read_current(root) == "v-1"
    assert list_versions(root) == [0, 1]
    assert open_version(root).manifest.parent == 0
    assert not [p for p in root.iterdir() if p.name.startswith(".staging")]


def test_load_reads_no_item_data(fitted, tmp_path):
    fitted.save(tmp_path / "idx")
    index = GeniusIndex.load(tmp_path / "idx")
    # Memory-mapped: partitions, item tables (Arrow IPC) and vectors stay on disk.
    assert isinstance(index.trie.partitions[0].ids, np.memmap)
    assert isinstance(index.vectors.arrays[0], np.memmap)
    assert len(index.items.tables) == -(-len(fitted) // 64)
    assert index.items.tables[0].column("key").chunk(0).buffers()[2].is_cpu


def test_reader_keeps_its_version_while_a_new_one_is_published(fitted, synthetic, tmp_path):
    root = tmp_path / "idx"
    fitted.save(root)
    reader = GeniusIndex.load(root)
    before = reader.search(synthetic.test_queries[:10], k=5)
    reader.delete(before.keys[0][:3])  # publishes v-1 without three of the hits
    assert read_current(root) == "v-1"
    again = reader.search(synthetic.test_queries[:10], k=5)
    assert again.keys == before.keys, "an open reader must keep serving the version it opened"
    fresh = GeniusIndex.load(root)
    assert not set(before.keys[0][:3]) & {k for row in fresh.search(synthetic.test_queries[:10], k=5).keys for k in row}


def test_concurrent_update_from_a_stale_parent_is_refused(fitted, tmp_path):
    root = tmp_path / "idx"
    fitted.save(root)
    stale = VersionWriter(root)  # starts from v-0
    fitted.save(root)  # v-1 published meanwhile
    with pytest.raises(PublishConflictError, match="published after"):
        from genius.store.manifest import Manifest
        stale.publish(Manifest.read(root / "v-0"))
    stale.discard()
    assert read_current(root) == "v-1"


WRITER = textwrap.dedent("""
    import os, sys, time
    import genius.store.publish as publish
    from genius.index import GeniusIndex
    index = GeniusIndex.load(sys.argv[1])
    stage = sys.argv[2]
    # Stop (and wait to be killed) at the chosen point of the save.
    def pause(*_a, **_k):
        sys.stdout.write("ready\\n"); sys.stdout.flush(); time.sleep(60)
    if stage == "files":
        import genius.store.data_files as d
        d.write_item_tables = lambda *a, **k: pause()
    elif stage == "manifest":
        publish.file_entries = lambda *a, **k: pause()
    elif stage == "rename":
        real = os.rename
        def slow_rename(src, dst):
            if ".staging" in str(src):
                pause()
            return real(src, dst)
        publish.os.rename = slow_rename
    elif stage == "current":
        publish.write_atomic = lambda *a, **k: pause()
    index.save(sys.argv[1])
""")


@pytest.mark.parametrize("stage", ["files", "manifest", "rename", "current"])
def test_writer_killed_mid_save_leaves_the_published_version(fitted, synthetic, tmp_path, stage):
    root = tmp_path / "idx"
    fitted.save(root)
    expected = GeniusIndex.load(root).search(synthetic.test_queries[:5], k=5).keys
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), stage], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    # Whatever the writer left behind, CURRENT still names a complete, readable version.
    assert read_current(root) in ("v-0", "v-1")
    loaded = GeniusIndex.load(root)
    assert loaded.search(synthetic.test_queries[:5], k=5).keys == expected
    from genius.store.verify import verify_version
    assert verify_version(root).ok


def test_gc_keeps_current_and_newest(fitted, tmp_path):
    root = tmp_path / "idx"
    for _ in range(4):
        fitted.save(root)
    abandoned = root / ".staging-abandoned"
    abandoned.mkdir()
    old = time.time() - 7200
    os.utime(abandoned, (old, old))
    young = root / ".staging-running"
    young.mkdir()
    removed = {p.name for p in gc(root, keep=2)}
    assert removed == {"v-0", "v-1", ".staging-abandoned"}
    assert list_versions(root) == [2, 3] and young.exists()
    loaded = GeniusIndex.load(root)  # the current version survives gc whole
    assert loaded.path.name == "v-3" and len(loaded) == len(fitted)
    assert verify_version(root).ok


def test_v1_folder_and_missing_index_are_named(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "index.json").write_text('{"format_version": 1}')
    with pytest.raises(IndexFormatError, match="format version 1"):
        GeniusIndex.load(tmp_path / "old")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GeniusIndex.load(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / CURRENT).write_text("../../etc")
    with pytest.raises(IndexFormatError, match="not a version folder"):
        GeniusIndex.load(tmp_path / "bad")

import io

import numpy as np
import pytest
from PIL import Image

from genius.data import fashion_mnist
from genius.data.shards import MissingSourceError, ReadStats, iter_shards
from tests.genius.data.fakes import fake_fashion_mnist, write_idx


def test_converts_fake_package(tmp_path):
    src = tmp_path / "src"
    data = fake_fashion_mnist(src, n_train=12, n_test=5)
    manifest = fashion_mnist.convert(tmp_path / "out", source=src, shard_size=8)
    assert manifest["items"] == 17 and manifest["modalities"] == {"image_text": 17}
    assert [s["items"] for s in manifest["shards"]] == [8, 8, 1] and manifest["skipped"] == {}
    stats = ReadStats()
    records = list(iter_shards(tmp_path / "out", stats=stats))
    assert stats.ok and len(records) == 17
    first, last = records[0], records[-1]
    assert first.key == "fmnist-train-00000" and last.key == "fmnist-test-00004"
    assert last.meta["split"] == "test" and last.meta["index"] == 4
    for r in records:
        split, i = r.meta["split"], r.meta["index"]
        pixels = np.asarray(Image.open(io.BytesIO(r.image)))
        assert r.image_ext == "png" and pixels.shape == (28, 28)
        assert np.array_equal(pixels, data[f"{split}_images"][i])  # stored exactly as in the dataset
        assert r.meta["label"] == data[f"{split}_labels"][i]
        assert r.meta["class_name"] == fashion_mnist.CLASS_NAMES[r.meta["label"]]
        assert r.meta["tone"] in ("dark", "grey", "light")
    # the class noun is in every caption
    nouns = {r.text for r in records if r.meta["label"] == 9}
    assert nouns and all("ankle boot" in t for t in nouns)
    assert any(t.startswith("trousers") or "of trousers" in t or " trousers" in t
               for t in (r.text for r in records if r.meta["label"] == 1))


def test_same_seed_same_shards_and_limit_spread_over_splits(tmp_path):
    src = tmp_path / "src"
    fake_fashion_mnist(src, n_train=12, n_test=6)
    a = fashion_mnist.convert(tmp_path / "a", source=src, limit=6)
    b = fashion_mnist.convert(tmp_path / "b", source=src, limit=6)
    assert a["shards"][0]["sha256"] == b["shards"][0]["sha256"]
    assert a["notes"]["per_split"] == {"train": 4, "test": 2} and a["items"] == 6
    only_test = fashion_mnist.convert(tmp_path / "c", source=src, splits=("test",))
    assert only_test["items"] == 6


def test_captions_vary_with_attributes():
    rng = np.random.default_rng(0)
    texts = {fashion_mnist.caption(9, "dark", "patterned", rng)[0] for _ in range(200)}
    assert len(texts) > 5 and all("ankle boot" in t for t in texts)
    assert any("patterned" in t for t in texts) and any(w in " ".join(texts) for w in ("dark", "black"))
    assert "an ankle boot" in " ".join(texts)  # article agrees
    assert fashion_mnist.tone_of(10) == "dark" and fashion_mnist.tone_of(250) == "light"


def test_bad_label_is_skipped_and_counted(tmp_path):
    src = tmp_path / "src"
    fake_fashion_mnist(src, n_train=4, n_test=2)
    write_idx(src / "train-labels-idx1-ubyte.gz", np.array([0, 11, 2, 3]))
    manifest = fashion_mnist.convert(tmp_path / "out", source=src)
    assert manifest["items"] == 5 and manifest["skipped"] == {"bad_label": 1}


def test_corrupt_idx_file_names_the_file(tmp_path):
    src = tmp_path / "src"
    fake_fashion_mnist(src, n_train=4, n_test=2)
    (src / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        fashion_mnist.convert(tmp_path / "out", source=src)


def test_missing_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEFAULT_SOURCE", tmp_path / "nowhere")
    with pytest.raises(MissingSourceError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.convert(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="--source PATH"):
        fashion_mnist.convert(tmp_path / "out", source=tmp_path)


@pytest.mark.skipif(not (fashion_mnist.DEFAULT_SOURCE / "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_package_sample(tmp_path):
    manifest = fashion_mnist.convert(tmp_path, limit=50)
    assert manifest["items"] == 50 and manifest["notes"]["per_split"] == {"train": 43, "test": 7}
    records = list(iter_shards(tmp_path))
    assert len(records) == 50 and {r.meta["split"] for r in records} == {"train", "test"}
    assert records[0].meta["class_name"] == "Ankle boot"  # the dataset's first image

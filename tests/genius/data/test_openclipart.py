import io
import logging
import os

import pytest
from PIL import Image

from genius.data import openclipart
from genius.data.shards import MissingSourceError, ReadStats, iter_shards
from tests.genius.data.fakes import corrupt_png, huge_png_header, png_bytes

SVG = """<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/"
     xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <metadata>
    <rdf:RDF>
      <cc:Work rdf:about="">
        <dc:title>{title}</dc:title>
        <dc:description>{desc}</dc:description>
        <dc:subject><rdf:Bag><rdf:li>frog</rdf:li><rdf:li>green &amp; wet</rdf:li><rdf:li>frog</rdf:li></rdf:Bag></dc:subject>
        <dc:creator><cc:Agent><dc:title>Some Author</dc:title></cc:Agent></dc:creator>
      </cc:Work>
    </rdf:RDF>
  </metadata>
  <path d="M0 0"/>
</svg>
"""


def _package(root):
    png, svg = root / "png", root / "svg"
    (png / "animals" / "frogs").mkdir(parents=True)
    (png / "food").mkdir()
    (png / "science").mkdir()
    (svg / "animals" / "frogs").mkdir(parents=True)
    (png / "animals" / "frogs" / "green_frog_01.png").write_bytes(
        png_bytes((40, 30), (0, 160, 0, 128), mode="RGBA", title="green frog", Author="A. Artist"))
    (svg / "animals" / "frogs" / "green_frog_01.svg").write_text(SVG.format(title="svg title", desc="a frog"))
    (png / "animals" / "no_title_cat_01.png").write_bytes(png_bytes((20, 20)))
    (png / "animals" / "svg_title.png").write_bytes(png_bytes((20, 20)))
    (svg / "animals" / "svg_title.svg").write_text(SVG.format(title="Toad &amp; friends", desc=""))
    (png / "food" / "big_banana.png").write_bytes(png_bytes((500, 250), (250, 230, 0), title="banana"))
    (png / "food" / "bomb.png").write_bytes(huge_png_header(title="bomb"))
    (png / "food" / "over_bound.png").write_bytes(png_bytes((400, 400), title="over the bound"))
    (png / "food" / "broken.png").write_bytes(corrupt_png())
    (png / "food" / "notes.txt").write_text("not an image")
    os.symlink("../animals/frogs/green_frog_01.png", png / "science" / "frog_link.png")
    return png, svg


def test_converts_fake_package(tmp_path, caplog):
    png, _ = _package(tmp_path)
    with caplog.at_level(logging.WARNING):
        manifest = openclipart.convert(tmp_path / "out", source=png, max_side=256, max_pixels=150_000)
    assert manifest["skipped"] == {"image_too_large": 2, "bad_image": 1}
    assert manifest["items"] == 4 and manifest["notes"]["symlinks_merged"] == 1
    for name in ("bomb.png", "over_bound.png", "broken.png"):
        assert name in caplog.text
    stats = ReadStats()
    records = {r.meta["path"]: r for r in iter_shards(tmp_path / "out", stats=stats, check_images="decode")}
    assert stats.ok and len(records) == 4
    frog = records["animals/frogs/green_frog_01.png"]
    assert frog.text == "green frog" and frog.meta["title"] == "green frog" and frog.meta["title_source"] == "png"
    assert frog.meta["keywords"] == ["frog", "green & wet"] and frog.meta["description"] == "a frog"
    assert frog.meta["author"] == "A. Artist" and frog.meta["category"] == "animals/frogs"
    assert frog.meta["aliases"] == ["science/frog_link.png"]
    image = Image.open(io.BytesIO(frog.image))
    assert image.mode == "RGB" and image.size == (40, 30)
    assert image.getpixel((0, 0))[1] > image.getpixel((0, 0))[0]  # half-transparent green over white
    assert records["animals/svg_title.png"].text == "Toad & friends"
    assert records["animals/svg_title.png"].meta["title_source"] == "svg"
    assert records["animals/no_title_cat_01.png"].text == "no title cat"
    assert records["animals/no_title_cat_01.png"].meta["title_source"] == "filename"
    banana = records["food/big_banana.png"]
    assert Image.open(io.BytesIO(banana.image)).size == (256, 128)
    assert (banana.meta["width"], banana.meta["height"], banana.meta["stored_size"]) == (500, 250, [256, 128])


def test_default_bound_rejects_decompression_bomb_without_decoding(tmp_path):
    png, svg = _package(tmp_path)
    result = openclipart.process(openclipart.Entry(png / "food" / "bomb.png", "food/bomb.png"), svg, 256,
                                 openclipart.DEFAULT_MAX_IMAGE_PIXELS)
    assert result.record is None and result.skip[0] == "image_too_large"


def test_workers_and_limit(tmp_path):
    png, _ = _package(tmp_path)
    one = openclipart.convert(tmp_path / "one", source=png, max_pixels=150_000, limit=4)
    two = openclipart.convert(tmp_path / "two", source=png, max_pixels=150_000, limit=4, workers=2)
    assert one["items"] + sum(one["skipped"].values()) == 4
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]


def test_missing_svg_package_only_warns(tmp_path, caplog):
    png, svg = _package(tmp_path)
    with caplog.at_level(logging.WARNING):
        manifest = openclipart.convert(tmp_path / "out", source=png, svg_source=tmp_path / "no-svg")
    assert "apt-get install openclipart-svg" in caplog.text and manifest["items"] >= 4


def test_missing_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(openclipart, "DEFAULT_SOURCE", tmp_path / "nowhere")
    with pytest.raises(MissingSourceError, match="apt-get install openclipart-png"):
        openclipart.convert(tmp_path / "out")
    with pytest.raises(MissingSourceError, match="--source PATH"):
        openclipart.convert(tmp_path / "out", source=tmp_path / "nowhere")


@pytest.mark.skipif(not openclipart.DEFAULT_SOURCE.is_dir(), reason="Debian package openclipart-png not installed")
def test_real_package_sample(tmp_path):
    manifest = openclipart.convert(tmp_path, limit=50)
    assert manifest["items"] + sum(manifest["skipped"].values()) == 50 and manifest["items"] >= 45
    records = list(iter_shards(tmp_path))
    assert len(records) == manifest["items"]
    assert all(r.text and r.meta["title"] == r.text for r in records)
    assert all(max(Image.open(io.BytesIO(r.image)).size) <= 256 for r in records)
    if openclipart.DEFAULT_SVG_SOURCE.is_dir():
        assert sum(bool(r.meta["keywords"]) for r in records) > 25

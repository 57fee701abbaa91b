"""The search page (cluster.ui): the shard-member reader, the JSON API against a real `serve_local`,
and the page itself in headless Chromium (Selenium), on a small index of coloured images, texts
and image-text pairs built from WebDataset shards (sources "<shard file>/<key>")."""
from __future__ import annotations

import gzip
import io
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image, ImageDraw

from cluster.serve import ServerOptions, serve_local
from cluster.ui import start_ui
from cluster.ui.shard_media import MediaError, ShardMedia, build_shards
from genius.data.shards import Record, ShardReader, ShardWriter, to_items
from genius.index import GeniusIndex

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 60, 220), "yellow": (240, 210, 20),
           "magenta": (200, 40, 200), "cyan": (30, 200, 210), "orange": (250, 130, 20), "brown": (120, 70, 30)}
WORDS = ["violin", "lantern", "cactus", "harbor", "anchor", "teapot", "compass", "windmill"]
TOKEN = "ui-test-token"


def png(colour: tuple[int, int, int], shape: str = "square", size: tuple[int, int] = (64, 64)) -> bytes:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    box = (8, 8, size[0] - 8, size[1] - 8)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def corpus_records() -> list[Record]:
    records = [Record(f"img-{c}", image=png(rgb), image_ext="png", meta={"colour": c}) for c, rgb in COLOURS.items()]
    records += [Record(f"pair-{c}", image=png(rgb, "circle"), image_ext="png", text=f"a {c} circle on white",
                       meta={"colour": c}) for c, rgb in COLOURS.items()]
    records += [Record(f"txt-{w}", text=f"a photo of a {w}", meta={"word": w}) for w in WORDS]
    return records


def training_query(key: str) -> str:
    kind, name = key.split("-", 1)
    return {"img": f"a {name} square", "pair": f"{name} circle", "txt": f"the {name} again"}[kind]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Shards (10 records each) and an index of their 24 items in three vector shards."""
    import torch

    from genius.encoders import EncoderConfig, MultimodalEncoder
    from genius.index import GeniusIndex, IndexConfig
    from genius.items import Items

    root = tmp_path_factory.mktemp("ui")
    with ShardWriter(root / "shards", "ui", 10) as writer:
        for record in corpus_records():
            writer.write(record)
    records = list(ShardReader(root / "shards"))
    corpus = to_items(records)
    torch.manual_seed(0)
    encoder = MultimodalEncoder.from_config(EncoderConfig())
    queries = Items(texts=[training_query(r.key) for r in records])
    cfg = IndexConfig.for_corpus(len(records))
    cfg.quantizer = replace(cfg.quantizer, epochs=3)
    cfg.decoder_training = replace(cfg.decoder_training, epochs=3)
    cfg.items_per_file = 8  # three vector shards: one can be stopped for partial results
    fitted = GeniusIndex.fit(corpus, queries, np.arange(len(records)), cfg, encoder=encoder, progress=False)
    # GeniusIndex.fit keeps no sources: the same model and codes, with each record's source
    # "<shard file>/<key>" as a cluster build stores it.
    everything = np.arange(len(records))
    index = GeniusIndex.from_codes(
        cfg, fitted.quantizer, fitted.decoder, fitted.item_codes(everything), corpus.modality, corpus.keys,
        np.asarray(fitted.vectors[everything], dtype=np.float32), encoder,
        source=[f"{Path(r.shard).name}/{r.key}" for r in records],
        metadata=[json.dumps(r.meta) for r in records])
    index.save(root / "index")
    files = root / "files"
    files.mkdir()
    (files / "red.png").write_bytes(png(COLOURS["red"]))
    (files / "not-an-image.png").write_bytes(b"this is a text file, not a picture\n" * 10)
    return root


@pytest.fixture(scope="module")
def served(built):
    cluster = serve_local(str(built / "index"))
    ui = start_ui(cluster.address, str(built / "shards"), port=0)
    yield ui
    ui.stop()
    cluster.stop(0)


@pytest.fixture(scope="module")
def damaged(built):
    """A second cluster that wants a bearer token, with vector shard 0 (items 0-7) stopped."""
    cluster = serve_local(str(built / "index"), options=ServerOptions(tokens=(TOKEN,)))
    cluster.shards[0].stop(0).wait()
    ui = start_ui(cluster.address, str(built / "shards"), port=0, token=TOKEN)
    yield cluster, ui
    ui.stop()
    cluster.stop(0)


def search(ui, **body) -> tuple[int, dict]:
    reply = requests.post(ui.url + "api/search", json=body, timeout=60)
    return reply.status_code, reply.json()


# ----------------------------------------------------------------------------- shard reader


def test_shard_media_reads_members_after_one_scan(built, tmp_path):
    media = ShardMedia.from_spec(str(built / "shards"))
    assert sorted(media.by_name) == ["ui-000000.tar", "ui-000001.tar", "ui-000002.tar"]
    records = {r.key: r for r in ShardReader(built / "shards")}
    keys = ("img-red", "img-blue", "pair-red", "pair-brown", "txt-violin", "txt-windmill")
    assert len({records[k].shard for k in keys}) == 3
    for key in keys:
        record = records[key]
        source = f"{Path(record.shard).name}/{key}"
        found = media.describe(source)
        assert found == {"image": record.image is not None, "text": record.text}
        if record.image is not None:
            assert media.image(source) == (record.image, "image/png")
            with Image.open(io.BytesIO(media.thumbnail(source))) as thumb:
                assert thumb.format == "JPEG" and thumb.size == (64, 64)  # never enlarged
                assert thumb.getpixel((32, 32))[0] > 150 or key != "img-red"
        if record.text is not None:
            assert media.text(source) == record.text
    assert media.scans == 3  # every shard scanned once, however many reads

    for source, status in [("ui-000000.tar", 400), ("../../etc/passwd/x", 404), ("passwd/root", 404),
                           ("ui-000000.tar/no-such-key", 404), ("ui-000000.tar/../../etc/passwd", 404)]:
        with pytest.raises(MediaError) as err:
            media.describe(source)
        assert err.value.status == status
    with pytest.raises(MediaError, match="has no image"):
        media.thumbnail(f"{Path(records['txt-violin'].shard).name}/txt-violin")
    media.close()


def test_shard_media_large_compressed_and_url_shards(tmp_path):
    big = png((10, 120, 200), size=(600, 300))
    with ShardWriter(tmp_path / "plain", "big", 10) as writer:
        writer.write(Record("wide", image=big, image_ext="png", text="a wide picture"))
    plain = tmp_path / "plain" / "big-000000.tar"
    packed = tmp_path / "packed"
    packed.mkdir()
    with open(plain, "rb") as src, gzip.open(packed / "packed-000000.tar.gz", "wb") as out:
        shutil.copyfileobj(src, out)
    piped = tmp_path / "piped"
    piped.mkdir()
    shutil.copy(plain, piped / "piped-000000.tar")

    media = ShardMedia.from_spec([str(packed / "packed-000000.tar.gz"), f"pipe:cat {piped / 'piped-000000.tar'}"],
                                 max_shards=1)
    with Image.open(io.BytesIO(media.thumbnail("packed-000000.tar.gz/wide"))) as thumb:
        assert thumb.size == (256, 128)
    assert media.text("piped-000000.tar/wide") == "a wide picture"  # evicts the .tar.gz's copy
    assert media.image("packed-000000.tar.gz/wide")[0] == big  # scanned again
    assert media.scans == 3
    copies = list(media._tmp.iterdir())
    assert len(copies) == 1  # the evicted shard's temporary copy is gone
    media.close()
    assert not copies[0].exists()


def test_build_shards_from_the_build_record(tmp_path):
    assert build_shards(tmp_path) is None
    (tmp_path / ".build").mkdir()
    kept = tmp_path / "a.tar"
    kept.write_bytes(b"")
    job = {"settings": {"shards": [str(kept), str(tmp_path / "gone.tar")]}}
    (tmp_path / ".build" / "job.json").write_text(json.dumps(job))
    assert build_shards(tmp_path) == [str(kept)]


# ----------------------------------------------------------------------------- JSON API


def test_api_search_returns_hits_with_pictures_and_texts(served, built):
    status, body = search(served, text="a photo of a violin", k=5)
    assert status == 200, body
    assert body["version"] == "v-0" and body["partial"] is False and body["missing_shards"] == []
    top = body["hits"][0]
    assert top["key"] == "txt-violin" and top["modality"] == "text" and top["text"] == "a photo of a violin"
    assert top["source"].endswith("/txt-violin") and top["metadata"] == {"word": "violin"}
    assert top["thumbnail_url"] is None
    index = GeniusIndex.load(built / "index")  # the hit's ID is the item's stored semantic ID
    assert index.items.keys(np.array([top["item"]])) == ["txt-violin"]
    assert bytes.fromhex(top["id"]) == bytes(index.items.ids(np.array([top["item"]]))[0])
    assert len(bytes.fromhex(top["id"])) == index.codec.width

    status, body = search(served, text="red", k=24, modalities=["image", "image_text"], rerank=False, beam=30)
    assert status == 200 and body["hits"]
    assert {h["modality"] for h in body["hits"]} <= {"image", "image_text"}
    pair = next(h for h in body["hits"] if h["modality"] == "image_text")
    assert pair["text"] == f"a {pair['key'][5:]} circle on white"
    thumb = requests.get(served.url + pair["thumbnail_url"].lstrip("/"), timeout=10)
    assert thumb.headers["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size == (64, 64)
    original = requests.get(served.url + pair["image_url"].lstrip("/"), timeout=10)
    assert original.headers["Content-Type"] == "image/png"
    assert original.content == png(COLOURS[pair["key"][5:]], "circle")


def test_api_search_with_an_uploaded_image(served, built):
    image = (built / "files" / "red.png").read_bytes()
    reply = requests.post(served.url + "api/search", files={"image": ("red.png", image, "image/png")},
                          data={"k": "5", "modality": ["image"], "rerank": "1"}, timeout=60)
    assert reply.status_code == 200, reply.text
    hits = reply.json()["hits"]
    assert hits and {h["modality"] for h in hits} == {"image"}
    assert hits[0]["key"] == "img-red"  # the same picture
    reply = requests.post(served.url + "api/search", files={"image": ("red.png", image, "image/png")},
                          data={"text": "red", "k": "3"}, timeout=60)  # an image-text query
    assert reply.status_code == 200 and reply.json()["hits"]


@pytest.mark.parametrize("send, status, message", [
    (dict(json={"image": "dGhpcyBpcyBub3QgYW4gaW1hZ2U="}), 400, "cannot decode"),
    (dict(json={"image": "%%%"}), 400, "not valid base64"),
    (dict(json={"text": "   "}), 400, "type some text or add an image"),
    (dict(json={"text": "red", "k": "many"}), 400, "k must be a whole number"),
    (dict(json={"text": "red", "k": 100000}), 400, "k must lie in [1, 1000]"),
    (dict(json={"text": "red", "modalities": ["video"]}), 400, "unknown modality 'video'"),
    (dict(json={"text": "x" * 5000}), 400, "over the limit"),
    (dict(data=b"{not json", headers={"Content-Type": "application/json"}), 400, "not valid JSON"),
    (dict(data=b"text=red", headers={"Content-Type": "text/plain"}), 415, "JSON or multipart"),
    (dict(files={"image": ("big.png", b"\0" * ((20 << 20) + 1), "image/png")}), 413, "images up to 20 MiB"),
    (dict(data=b"x" * (22 << 20), headers={"Content-Type": "application/json"}), 413, "images up to 20 MiB"),
])
def test_api_errors_are_plain_messages(served, send, status, message):
    reply = requests.post(served.url + "api/search", timeout=60, **send)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert message in error and "Traceback" not in error and "object at 0x" not in error


def test_api_item_errors(served):
    for query, status in [("source=ui-000000.tar%2Fnope", 404), ("source=..%2F..%2Fetc%2Fpasswd", 404),
                          ("source=nothing", 400), ("source=ui-000000.tar%2Fimg-red&part=pixels", 400)]:
        reply = requests.get(served.url + "api/item?" + query, timeout=10)
        assert reply.status_code == status and reply.json()["error"]
    assert requests.get(served.url + "static/../server.py", timeout=10).status_code in (403, 404)


def test_api_token_unavailable_and_partial(damaged):
    cluster, ui = damaged
    status, body = search(ui, text="a photo of a violin", k=24, beam=30)
    assert status == 200 and body["partial"] is True and body["missing_shards"] == ["0:0-8"]
    assert body["hits"] and all(h["item"] >= 8 for h in body["hits"])
    with start_ui(cluster.address, port=0) as no_token:
        status, body = search(no_token, text="red")
        assert status == 401 and "bearer token" in body["error"] and "--token-file" in body["error"]
        with pytest.raises(requests.HTTPError):
            requests.get(no_token.url + "api/item?source=a%2Fb", timeout=10).raise_for_status()
    with start_ui("127.0.0.1:1", port=0, timeout=3) as nowhere:
        status, body = search(nowhere, text="red")
        assert status == 503 and "unavailable" in body["error"]


# ----------------------------------------------------------------------------- the page in Chromium


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def browser():
    found = _chromium()
    if found is None:
        pytest.skip("Chromium is missing: install the Debian packages chromium and chromium-driver "
                    "(.ci/run does when run as root)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is missing: pip install -e '.[test]'")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--hide-scrollbars", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(found[1]), options=options)  # no Selenium Manager download
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


class Page:
    """The search page in the browser: fill in the form, search, read the cards."""

    def __init__(self, driver, url: str):
        from selenium.webdriver.common.by import By

        self.driver, self.by = driver, By
        driver.get(url)
        self.wait(lambda d: "search replicas at" in self.find("service").text)

    def find(self, element_id: str):
        return self.driver.find_element(self.by.ID, element_id)

    def wait(self, condition, timeout: float = 30):
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout).until(condition)

    def searches(self) -> int:
        return int(self.driver.find_element(self.by.TAG_NAME, "body").get_attribute("data-searches"))

    def search(self, text: str | None = None, modalities: tuple[str, ...] | None = None, submit=None) -> str:
        if text is not None:
            box = self.find("text")
            box.clear()
            box.send_keys(text)
        if modalities is not None:
            for checkbox in self.driver.find_elements(self.by.CSS_SELECTOR, 'input[name="modality"]'):
                if checkbox.is_selected() != (checkbox.get_attribute("value") in modalities):
                    checkbox.click()
        before = self.searches()
        (submit or self.find("submit").click)()
        self.wait(lambda d: self.searches() > before)
        return self.driver.find_element(self.by.TAG_NAME, "body").get_attribute("data-state")

    def cards(self) -> list[tuple[str, str]]:
        return [(c.get_attribute("data-key"), c.get_attribute("data-modality"))
                for c in self.driver.find_elements(self.by.CSS_SELECTOR, "#results .hit")]

    def set_image(self, path: Path) -> None:
        self.find("image-input").send_keys(str(path))
        self.wait(lambda d: self.find("preview").is_displayed())


def test_page_text_query_shows_the_expected_top_hit(browser, served):
    page = Page(browser, served.url)
    assert page.search("a photo of a violin") == "done"
    assert page.cards()[0] == ("txt-violin", "text")
    first = browser.find_element(page.by.CSS_SELECTOR, "#results .hit")
    assert "a photo of a violin" in first.text and "#1" in first.text and "id " in first.text
    assert "index v-0" in page.find("status").text
    assert not page.find("error").is_displayed() and not page.find("partial").is_displayed()
    # No script error or blocked resource (the page loads nothing from outside this server).
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def test_page_uploaded_image_shows_hits_with_thumbnails(browser, served, built):
    page = Page(browser, served.url)
    page.set_image(built / "files" / "red.png")
    assert page.search("", modalities=("image",)) == "done"
    cards = page.cards()
    assert cards[0] == ("img-red", "image") and {m for _, m in cards} == {"image"}
    thumb = browser.find_element(page.by.CSS_SELECTOR, "#results .hit img.thumb")
    page.wait(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", thumb) == 64)


def test_page_dropped_image_and_more_like_this(browser, served, built):
    page = Page(browser, served.url)
    data = list((built / "files" / "red.png").read_bytes())
    browser.execute_script("""
        const file = new File([new Uint8Array(arguments[0])], "dropped.png", {type: "image/png"});
        const transfer = new DataTransfer();
        transfer.items.add(file);
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true}));
    """, data)
    page.wait(lambda d: "dropped.png" in page.find("preview-name").text)
    assert page.search("a red circle", modalities=("image_text",)) == "done"  # image + text together
    assert page.cards() and {m for _, m in page.cards()} == {"image_text"}
    # Clicking an image-text hit searches with its picture and its text.
    pair = next(c for c in browser.find_elements(page.by.CSS_SELECTOR, "#results .hit.image_text"))
    key = pair.get_attribute("data-key")
    assert page.search(submit=pair.click) == "done"
    assert page.find("text").get_attribute("value") == f"a {key[5:]} circle on white"
    assert page.find("preview-name").text.startswith(key) and page.cards()[0][0] == key


def test_page_bad_upload_shows_the_error_message(browser, served, built):
    page = Page(browser, served.url)
    page.set_image(built / "files" / "not-an-image.png")
    assert page.search("") == "error"
    error = page.find("error")
    assert error.is_displayed() and "cannot decode" in error.text
    assert "Traceback" not in browser.page_source
    page.find("clear-image").click()
    assert page.search("") == "error" and "add an image" in page.find("error").text


def test_page_modality_filter_narrows_results(browser, served):
    page = Page(browser, served.url)
    assert page.search("a red circle on white", modalities=()) == "done"
    everything = page.cards()
    assert len({m for _, m in everything}) > 1
    assert page.search(modalities=("text",)) == "done"
    only_text = page.cards()
    assert only_text and {m for _, m in only_text} == {"text"}
    assert {k for k, _ in only_text} <= {f"txt-{w}" for w in WORDS}


def test_page_flags_partial_results(browser, damaged):
    _, ui = damaged
    page = Page(browser, ui.url)
    assert page.search("a photo of a violin") == "done"
    partial = page.find("partial")
    assert partial.is_displayed() and "0:0-8" in partial.text and "Partial results" in partial.text


def test_page_screenshot_is_not_blank(browser, served, built, tmp_path):
    page = Page(browser, served.url)
    assert page.search("a green circle", modalities=("image", "image_text")) == "done"
    for thumb in browser.find_elements(page.by.CSS_SELECTOR, "#results img.thumb")[:6]:
        page.wait(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", thumb))
    time.sleep(0.2)  # let the last thumbnails paint
    shot = tmp_path / "ui.png"
    assert browser.save_screenshot(str(shot))
    with Image.open(shot) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    assert rgb.shape[0] >= 600 and rgb.shape[1] >= 1000
    colours = {tuple(c) for c in rgb[::4, ::4].reshape(-1, 3)}
    assert len(colours) > 50 and rgb.std() > 20  # text, cards and coloured thumbnails, not a blank page
    saturated = (rgb.max(axis=2) - rgb.min(axis=2)) > 100
    assert saturated.mean() > 0.005  # the coloured pictures are on it

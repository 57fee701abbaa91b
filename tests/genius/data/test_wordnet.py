import logging

import pytest

from genius.data import wordnet
from genius.data.shards import MissingSourceError, ReadStats, iter_shards
from genius.modality import Modality
from tests.genius.data.fakes import fake_wordnet


def test_converts_fake_database(tmp_path, caplog):
    src = tmp_path / "wn"
    fake_wordnet(src)
    with caplog.at_level(logging.WARNING):
        manifest = wordnet.convert(tmp_path / "out", source=src)
    assert manifest["items"] == 5 and manifest["modalities"] == {"text": 5}
    assert manifest["skipped"] == {"bad_line": 1}
    assert f"{src / 'data.noun'}:5" in caplog.text  # file and line of the bad synset line
    stats = ReadStats()
    records = {r.key: r for r in iter_shards(tmp_path / "out", stats=stats)}
    assert stats.ok and all(r.modality == Modality.TEXT for r in records.values())
    dog = next(r for r in records.values() if r.meta["lemmas"][0] == "dog")
    assert dog.text == "dog, domestic dog, Canis familiaris"
    assert dog.meta["definition"] == "a member of the genus Canis"
    assert dog.meta["examples"] == ["the dog barked all night", "a dog's life"]
    assert dog.meta["pos"] == "n" and dog.meta["lexname"] == "noun.animal"
    assert dog.meta["hypernyms"] == ["wn-n-00000099"] and dog.key == f"wn-n-{dog.meta['offset']:08d}"
    adj = next(r for r in records.values() if r.meta["pos"] == "s")
    assert adj.meta["lemmas"] == ["abounding", "galore"] and adj.key.startswith("wn-a-")
    verb = next(r for r in records.values() if r.meta["pos"] == "v")
    assert verb.meta["definition"] == "draw air into, and expel out of, the lungs"
    assert verb.meta["lexname"] == "verb.body"
    adv = next(r for r in records.values() if r.meta["pos"] == "r")
    assert adv.meta["definition"] == "only just" and adv.meta["examples"] == []


def test_limit_spreads_over_parts_of_speech(tmp_path):
    src = tmp_path / "wn"
    fake_wordnet(src)
    manifest = wordnet.convert(tmp_path / "out", source=src, limit=4)
    assert manifest["items"] + sum(manifest["skipped"].values()) == 4
    assert set(manifest["notes"]["per_file"]) >= {"data.verb", "data.adj"}


def test_split_gloss():
    assert wordnet.split_gloss('a "quoted" word in a definition') == ('a "quoted" word in a definition', [])
    assert wordnet.split_gloss('"only an example"') == ("", ["only an example"])
    assert wordnet.split_gloss('def; more def; "ex 1"; "ex 2" - Author') == ("def; more def", ["ex 1", "ex 2"])


def test_missing_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(wordnet, "DEFAULT_SOURCE", tmp_path / "nowhere")
    with pytest.raises(MissingSourceError, match="apt-get install wordnet-base"):
        wordnet.convert(tmp_path / "out")
    with pytest.raises(MissingSourceError, match="--source PATH"):
        wordnet.convert(tmp_path / "out", source=tmp_path)


@pytest.mark.skipif(not (wordnet.DEFAULT_SOURCE / "data.noun").exists(), reason="Debian package wordnet-base not installed")
def test_real_package_sample(tmp_path):
    manifest = wordnet.convert(tmp_path, limit=50)
    assert manifest["items"] == 50 and manifest["skipped"] == {}
    records = list(iter_shards(tmp_path))
    assert records[0].key == "wn-n-00001740" and records[0].text == "entity"
    assert {r.meta["pos"] for r in records} >= {"n", "v"}
    assert all(r.meta["definition"] for r in records)

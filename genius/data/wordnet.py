"""WordNet 3.0 → text-only WebDataset shards, from the Debian package `wordnet-base`.

One record per synset (about 117k) of `data.noun`, `data.verb`, `data.adj`, `data.adv`
(WordNet's database format, wndb(5WN)). The record's text is the synset's lemmas joined
("dog, domestic dog, Canis familiaris"); the JSON holds the synset offset, part of
speech, lexicographer file name, lemmas, lemma text, definition (the gloss without
its examples), examples and hypernym keys, so that definitions can serve as queries for
their synset and lexicographer files as coarse labels.

Keys are ``wn-<n|v|a|r>-<offset>``: offsets are unique within one data file only.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from genius.data.shards import (
    MissingSourceError, ProgressFactory, Record, ShardWriter, open_progress, spread_limit,
)

log = logging.getLogger(__name__)

DEFAULT_SOURCE = Path("/usr/share/wordnet")
PACKAGE = "wordnet-base"
FILES = (("noun", "n"), ("verb", "v"), ("adj", "a"), ("adv", "r"))
# WordNet 3.0's lexnames file (not shipped by wordnet-base): lex_filenum → name.
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change",
    "verb.cognition", "verb.communication", "verb.competition", "verb.consumption", "verb.contact",
    "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social",
    "verb.stative", "verb.weather", "adj.ppl",
)
_SS_TYPES = {"n": "n", "v": "v", "a": "a", "s": "a", "r": "r"}  # satellites live in data.adj
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # syntactic markers on adjectives, e.g. galore(ip)
_HYPERNYM = frozenset({"@", "@i"})


class WordNetFormatError(ValueError):
    pass


def find_files(source: str | Path | None) -> list[tuple[Path, str]]:
    """The data files present, as (path, key letter); all four must be there."""
    folder = Path(source) if source is not None else DEFAULT_SOURCE
    files = [(folder / f"data.{name}", letter) for name, letter in FILES]
    missing = [p.name for p, _ in files if not p.is_file()]
    if missing:
        hint = (f"install the Debian package: apt-get install {PACKAGE}" if source is None
                else f"pass --source PATH to a folder holding them (or apt-get install {PACKAGE})")
        raise MissingSourceError(f"WordNet data files not found in {folder}: {', '.join(missing)}; {hint}")
    return files


def split_gloss(gloss: str) -> tuple[str, list[str]]:
    """'definition; "example one"; "example two"' → (definition, examples)."""
    gloss = gloss.strip()
    cut = gloss.find('; "')
    if gloss.startswith('"'):
        cut = 0
    if cut < 0:
        return gloss.rstrip("; "), []
    definition = gloss[:cut].strip().rstrip(";").strip()
    examples = [e.strip() for e in re.findall(r'"([^"]*)"', gloss[cut:]) if e.strip()]
    return definition, examples


def parse_line(line: str, letter: str) -> dict[str, Any]:
    """One data-file line → the record's metadata; WordNetFormatError when malformed."""
    head, bar, gloss = line.partition(" | ")
    tok = head.split()
    try:
        offset, lex_filenum, ss_type = tok[0], int(tok[1]), tok[2]
        if not offset.isdigit() or ss_type not in _SS_TYPES:
            raise WordNetFormatError(f"bad synset header {' '.join(tok[:3])!r}")
        w_cnt = int(tok[3], 16)
        pos = 4
        lemmas = []
        for _ in range(w_cnt):
            lemmas.append(_ADJ_MARKER.sub("", tok[pos]).replace("_", " "))
            pos += 2  # word, lex_id
        p_cnt = int(tok[pos])
        pos += 1
        hypernyms = []
        for _ in range(p_cnt):
            symbol, target, target_pos = tok[pos], tok[pos + 1], tok[pos + 2]
            if symbol in _HYPERNYM:
                hypernyms.append(f"wn-{_SS_TYPES[target_pos]}-{target}")
            pos += 4  # symbol, offset, pos, source/target
    except (IndexError, ValueError, KeyError) as e:
        raise WordNetFormatError(f"cannot parse synset line: {e}") from None
    if not lemmas or w_cnt == 0:
        raise WordNetFormatError("synset has no words")
    definition, examples = split_gloss(gloss) if bar else ("", [])
    lexname = LEXNAMES[lex_filenum] if 0 <= lex_filenum < len(LEXNAMES) else str(lex_filenum)
    return {
        "synset": f"wn-{letter}-{offset}",
        "offset": int(offset),
        "pos": ss_type,
        "lexname": lexname,
        "lemmas": lemmas,
        "lemma_text": ", ".join(lemmas),
        "definition": definition,
        "examples": examples,
        "hypernyms": hypernyms,
    }


def _synset_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of the synset lines; the license header lines start with spaces."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.startswith(b"  ") or not raw.strip():
                continue
            try:
                yield number, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:  # WordNet 3.0 is ASCII; older copies may be Latin-1
                yield number, raw.decode("latin-1").rstrip("\r\n")


def _count_synsets(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for raw in f if raw.strip() and not raw.startswith(b"  "))


def convert(
    out_dir: str | Path,
    *,
    source: str | Path | None = None,
    limit: int | None = None,
    shard_size: int = 20_000,
    progress: ProgressFactory | None = None,
) -> dict[str, Any]:
    """Write WordNet as text-only shards ``wordnet-NNNNNN.tar``; return the manifest.
    `limit` caps the total, spread over the parts of speech (first synsets of each)."""
    files = find_files(source)
    counts = [_count_synsets(p) for p, _ in files]
    limits = spread_limit(counts, limit)
    bar = open_progress(progress, sum(limits), "wordnet")
    with ShardWriter(out_dir, "wordnet", shard_size, dataset="wordnet", source=str(files[0][0].parent),
                     options={"limit": limit}) as writer:
        try:
            per_pos: dict[str, int] = {}
            for (path, letter), n in zip(files, limits):
                done = 0
                for number, line in _synset_lines(path):
                    if done >= n:
                        break
                    done += 1
                    bar.update()
                    try:
                        meta = parse_line(line, letter)
                    except WordNetFormatError as e:
                        writer.skip("bad_line", f"{path}:{number}", str(e))
                        continue
                    key = meta["synset"]
                    if writer.has_key(key):
                        writer.skip("duplicate_synset", f"{path}:{number}", f"offset {meta['offset']} seen before")
                        continue
                    writer.write(Record(key=key, text=meta["lemma_text"], meta=meta))
                    per_pos[path.name] = per_pos.get(path.name, 0) + 1
            writer.notes["per_file"] = per_pos
        finally:
            bar.close()
        return writer.close()

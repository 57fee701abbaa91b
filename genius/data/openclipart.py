"""Openclipart → WebDataset shards, from the Debian packages `openclipart-png` (+ `-svg`).

Each clip-art PNG becomes an image-text record: the caption is the PNG's ``Title`` text
chunk (else the SVG's ``dc:title``, else words of the file name; `title_source` says
which), and the JSON adds the keywords (``dc:subject``) and description of the matching
SVG file when `openclipart-svg` is installed, the author, the category folder and the
original size. Titles are noisy: only about 2,700 distinct ones label the ~6,900
distinct images (one, "gramastar", labels 1,375), so the title is kept in the metadata
for evaluations that count images with the same title as relevant.

Images are decoded with `genius.encoders.decode_image_bytes` (bounded by `max_pixels`:
16 PNGs of the package are above the default 36 MP, up to 623 MP, and are skipped as
`image_too_large` — PNG cannot be decoded at reduced size), composited over white, shrunk
to at most `max_side` px on the long side and stored as RGB PNG. The package holds about
1,200 symbolic links that put the same file in a second category: each file becomes one
record, its other paths listed in `aliases`.
"""
from __future__ import annotations

import html
import io
import logging
import os
import re
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from genius.data.shards import (
    DEFAULT_SHARD_SIZE, MissingSourceError, ProgressFactory, Record, ShardWriter, make_key, open_progress,
)
from genius.encoders import DEFAULT_MAX_IMAGE_PIXELS, decode_image_bytes, validate_text

log = logging.getLogger(__name__)

DEFAULT_SOURCE = Path("/usr/share/openclipart/png")
DEFAULT_SVG_SOURCE = Path("/usr/share/openclipart/svg")
PACKAGE, SVG_PACKAGE = "openclipart-png", "openclipart-svg"
DEFAULT_MAX_SIDE = 256
_SVG_HEAD_BYTES = 1 << 20  # metadata sits near the top; some SVGs are many MB of paths


@dataclass
class Entry:
    path: Path  # the real file
    rel: str  # its path under the PNG root, e.g. 'animals/birds/puffin.png'
    aliases: list[str] = field(default_factory=list)  # symbolic links to the same file


def find_entries(root: Path) -> tuple[list[Entry], int]:
    """Distinct PNG files under `root` (symbolic links merged into their target's entry);
    also returns the number of links merged."""
    by_target: dict[Path, Entry] = {}
    links: list[tuple[str, Path]] = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if not name.lower().endswith(".png"):
                continue
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                links.append((rel, path.resolve()))
            else:
                by_target[path.resolve()] = Entry(path, rel)
    merged = 0
    for rel, target in links:
        if target in by_target:
            by_target[target].aliases.append(rel)
            merged += 1
        elif target.is_file():  # a link to a file outside the tree: its own record
            by_target[target] = Entry(target, rel)
        else:
            log.warning("%s: broken symbolic link, ignored", root / rel)
    return sorted(by_target.values(), key=lambda e: e.rel), merged


def svg_metadata(path: Path) -> dict[str, Any]:
    """title, description and keywords from an Openclipart SVG's RDF metadata ({} if none)."""
    try:
        with open(path, "rb") as f:
            head = f.read(_SVG_HEAD_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return {}
    start, end = head.find("<metadata"), head.find("</metadata>")
    if start < 0 or end < 0:
        return {}
    meta = head[start:end]
    out: dict[str, Any] = {}
    # Regexes, not an XML parser: the namespace prefixes are declared on <svg>, outside
    # this slice, and the slice is all we read of large files.
    work = re.search(r"<cc:Work\b.*?</cc:Work>", meta, re.S)
    scope = work.group(0) if work else meta
    scope_no_agents = re.sub(r"<cc:Agent\b.*?</cc:Agent>", "", scope, flags=re.S)
    title = re.search(r"<dc:title>(.*?)</dc:title>", scope_no_agents, re.S)
    if title and _clean(title.group(1)):
        out["title"] = _clean(title.group(1))
    desc = re.search(r"<dc:description>(.*?)</dc:description>", scope_no_agents, re.S)
    if desc and _clean(desc.group(1)):
        out["description"] = _clean(desc.group(1))
    subject = re.search(r"<dc:subject>(.*?)</dc:subject>", scope, re.S)
    if subject:
        words = [_clean(w) for w in re.findall(r"<rdf:li>(.*?)</rdf:li>", subject.group(1), re.S)]
        out["keywords"] = list(dict.fromkeys(w for w in words if w))
    return out


def _clean(text: str) -> str:
    return " ".join(html.unescape(text).split())


def _filename_title(rel: str) -> str:
    stem = Path(rel).stem
    words = re.sub(r"[_\-.]+", " ", stem).split()
    while words and words[-1].isdigit():  # drop the '_01' version suffixes
        words.pop()
    return " ".join(words) or stem


@dataclass
class _Result:
    record: Record | None
    skip: tuple[str, str] | None = None  # (reason, detail)


def process(entry: Entry, svg_root: Path | None, max_side: int, max_pixels: int) -> _Result:
    """One PNG → a record, or the reason it cannot be used. Runs in worker processes."""
    try:
        data = entry.path.read_bytes()
    except OSError as e:
        return _Result(None, ("unreadable_file", str(e)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            header = Image.open(io.BytesIO(data))  # header and text chunks only
            width, height = header.size
            info = {k: v for k, v in header.info.items() if isinstance(v, str)}
    except Image.DecompressionBombError as e:
        return _Result(None, ("image_too_large", str(e)))
    except Exception as e:  # PIL raises many types for bad data
        return _Result(None, ("bad_image", f"{type(e).__name__}: {e}"))
    if width * height > max_pixels:
        return _Result(None, ("image_too_large", f"{width}x{height} = {width * height} pixels > {max_pixels}"))
    try:
        image = decode_image_bytes(data, max_pixels)
    except ValueError as e:
        return _Result(None, ("bad_image", str(e)))
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)  # keeps aspect, never enlarges
    buf = io.BytesIO()
    image.save(buf, format="PNG")

    svg = svg_metadata(svg_root / Path(entry.rel).with_suffix(".svg")) if svg_root is not None else {}
    title, source = _clean(info.get("Title", "")), "png"
    if not title and svg.get("title"):
        title, source = svg["title"], "svg"
    if not title:
        title, source = _filename_title(entry.rel), "filename"
    try:
        validate_text(title)
    except ValueError as e:
        return _Result(None, ("bad_text", str(e)))
    meta = {
        "title": title,
        "title_source": source,
        "description": _clean(info.get("Description", "")) or svg.get("description", ""),
        "author": _clean(info.get("Author", "")),
        "keywords": svg.get("keywords", []),
        "category": str(Path(entry.rel).parent.as_posix()),
        "path": entry.rel,
        "aliases": entry.aliases,
        "width": width,
        "height": height,
        "stored_size": list(image.size),
    }
    key = "ocal-" + make_key(str(Path(entry.rel).with_suffix("").as_posix()))
    return _Result(Record(key=key, image=buf.getvalue(), image_ext="png", text=title, meta=meta))


def _process_star(args: tuple[Entry, Path | None, int, int]) -> _Result:
    return process(*args)


def _sample(entries: list[Entry], limit: int | None) -> list[Entry]:
    """At most `limit` entries spread evenly over the sorted list (all categories)."""
    if limit is None or limit >= len(entries):
        return entries
    return [entries[i * len(entries) // limit] for i in range(limit)]


def convert(
    out_dir: str | Path,
    *,
    source: str | Path | None = None,
    svg_source: str | Path | None = None,
    limit: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    max_side: int = DEFAULT_MAX_SIDE,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    workers: int = 1,
    progress: ProgressFactory | None = None,
) -> dict[str, Any]:
    """Write Openclipart as shards ``openclipart-NNNNNN.tar``; return the manifest.
    `limit` takes that many files spread evenly over the sorted paths."""
    if max_side <= 0 or max_pixels <= 0 or workers <= 0:
        raise ValueError("max_side, max_pixels and workers must be positive")
    root = Path(source) if source is not None else DEFAULT_SOURCE
    if not root.is_dir():
        hint = (f"install the Debian package: apt-get install {PACKAGE}" if source is None
                else f"pass --source PATH to the folder of Openclipart PNGs (or apt-get install {PACKAGE})")
        raise MissingSourceError(f"Openclipart PNG folder not found: {root}; {hint}")
    entries, merged = find_entries(root)
    if not entries:
        raise MissingSourceError(f"no PNG files under {root}; pass --source PATH to the folder of Openclipart "
                                 f"PNGs (or apt-get install {PACKAGE})")
    svg_root = Path(svg_source) if svg_source is not None else (
        DEFAULT_SVG_SOURCE if source is None else root.parent / "svg")
    if not svg_root.is_dir():
        log.warning("no Openclipart SVG folder at %s: records get no keywords (apt-get install %s, "
                    "or pass --svg-source PATH)", svg_root, SVG_PACKAGE)
        svg_root = None
    chosen = _sample(entries, limit)
    options = {"limit": limit, "max_side": max_side, "max_pixels": max_pixels,
               "svg_source": str(svg_root) if svg_root else None}
    bar = open_progress(progress, len(chosen), "openclipart")
    jobs = ((e, svg_root, max_side, max_pixels) for e in chosen)
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    with ShardWriter(out_dir, "openclipart", shard_size, dataset="openclipart", source=str(root),
                     options=options) as writer:
        try:
            results = pool.map(_process_star, jobs, chunksize=4) if pool else map(_process_star, jobs)
            titles: dict[str, int] = {}
            for entry, result in zip(chosen, results):
                bar.update()
                if result.record is None:
                    assert result.skip is not None
                    writer.skip(result.skip[0], str(entry.path), result.skip[1])
                    continue
                record = result.record
                record.key = writer.unique_key(record.key)  # two paths may sanitise alike
                writer.write(record)
                titles[record.text or ""] = titles.get(record.text or "", 0) + 1
            writer.notes.update({
                "files": len(entries) + merged, "distinct_files": len(entries), "symlinks_merged": merged,
                "distinct_titles": len(titles),
                "top_titles": dict(sorted(titles.items(), key=lambda kv: -kv[1])[:10]),
                "relevance_rule": "images with the same title are relevant to each other (titles are noisy)",
            })
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        return writer.close()

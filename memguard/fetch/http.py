"""One file over HTTP(S): time-outs, retries with backoff (on 5xx, time-outs and dropped connections; never on
404/410 or another 4xx), redirects, and resume of a partial file (``Range``). The file is written to
``NAME.part`` and renamed when whole and its sha256 matches; a mismatch leaves it ``.part``."""

from __future__ import annotations

import os
import shutil
import tarfile
import time
import zipfile
from pathlib import Path

import requests

from memguard.errors import UserError
from memguard.fetch.manifest import sha256_of

CHUNK = 2**20
USER_AGENT = "memguard-fetch"


class FetchError(Exception):
    """A source could not be reached or served something unusable (one line: what and why)."""


class Retry(Exception):
    pass


def session() -> requests.Session:
    s = requests.Session()
    s.headers["User-Agent"] = USER_AGENT
    return s


def part_of(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def probe(url: str, timeout: float, s: requests.Session | None = None) -> int | None:
    """The size the server announces for ``url`` (redirects followed), or None where it announces none."""
    s = s or session()
    try:
        with s.get(url, stream=True, timeout=timeout, allow_redirects=True,
                   headers={"Accept-Encoding": "identity"}) as response:
            if response.status_code >= 400:
                raise FetchError(f"{url}: HTTP {response.status_code}")
            length = response.headers.get("Content-Length")
            return int(length) if length and length.isdigit() else None
    except requests.RequestException as err:
        raise FetchError(f"{url} could not be reached ({type(err).__name__})") from err


def check_hash(name: str, digest: str, sha256: str | None, prefix: str | None, part: Path) -> None:
    sha256, prefix = (str(sha256) if sha256 else None), (str(prefix) if prefix else None)  # Hydra reads 123... as int
    if sha256 and digest != sha256.lower():
        raise UserError(f"{name}: sha256 {digest} does not match the expected {sha256}; refused, left as {part} "
                        "(delete it to fetch again from the start)")
    if prefix and not digest.startswith(prefix.lower()):
        raise UserError(f"{name}: sha256 {digest} does not start with the pinned {prefix}; refused, left as {part} "
                        "(delete it to fetch again from the start)")


def download(url: str, dest: Path, *, sha256: str | None = None, sha256_prefix: str | None = None,
             timeout: float = 30.0, retries: int = 4, backoff: float = 0.5,
             s: requests.Session | None = None) -> str:
    """Fetch ``url`` into ``dest`` (through ``dest.part``, resumed where one is left); the file's sha256."""
    s = s or session()
    part = part_of(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        offset = part.stat().st_size if part.exists() else 0
        headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={offset}-"} if offset else {})}
        try:
            with s.get(url, headers=headers, stream=True, timeout=timeout, allow_redirects=True) as response:
                status = response.status_code
                if status == 416 and offset:  # the part is already whole
                    break
                if status >= 500:
                    raise Retry(f"HTTP {status}")
                if status >= 400:
                    raise FetchError(f"{url}: HTTP {status}")
                resumed = offset and status == 206
                length = response.headers.get("Content-Length")
                expected = (offset if resumed else 0) + int(length) if length and length.isdigit() else None
                with open(part, "ab" if resumed else "wb") as handle:
                    for chunk in response.iter_content(CHUNK):
                        handle.write(chunk)
                if expected is not None and part.stat().st_size < expected:
                    raise Retry("the connection closed early")
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError, Retry) as err:
            if attempt == retries:
                raise FetchError(f"{url} could not be fetched ({type(err).__name__}: {str(err)[:120]}; "
                                 f"{retries + 1} tries; {part.name} kept to resume)") from err
            time.sleep(backoff * 2**attempt)
    digest = sha256_of(part)
    check_hash(dest.name, digest, sha256, sha256_prefix, part)
    os.replace(part, dest)
    return digest


def free_space(folder: Path) -> int:
    parent = folder.absolute()
    while not parent.exists():
        parent = parent.parent
    return shutil.disk_usage(parent).free


def unpack(archive: Path, kind: str, subfolder: str | None, dest: Path, key: str) -> list[Path]:
    """Unpack ``archive`` (zip or tar) and move its ``subfolder`` (or the whole) to ``dest``; the files written.
    Members whose names would leave the folder are refused before anything is written."""
    from memguard.fetch.sources import safe_join

    staging = dest.with_name(f".{dest.name}.unpack")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as z:
                for name in z.namelist():
                    if name.strip("/"):
                        safe_join(staging, name.rstrip("/"), key)
                z.extractall(staging)
        else:
            with tarfile.open(archive) as t:
                for member in t.getmembers():
                    safe_join(staging, member.name, key)
                    if member.issym() or member.islnk():
                        raise UserError(f"sources.{key}: the archive holds a link ({member.name}); refused")
                t.extractall(staging, filter="data")
        root = staging
        if subfolder:
            root = safe_join(staging, subfolder, key)
            if not root.is_dir():
                raise UserError(f"sources.{key}.subfolder={subfolder!r} is not a folder of {archive.name}")
        if dest.exists():
            shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(root, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sorted(p for p in dest.rglob("*") if p.is_file())

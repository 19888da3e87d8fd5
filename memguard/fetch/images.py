"""Image URL lists (``kind: url_list``): each prompt's image from the URL in a column of the prompt file, fetched
concurrently (a thread pool, at most ``fetch.per_host`` requests to one host at a time), decoded and verified as
an image with PIL (an HTML page served with 200 is a failure, so is a truncated file), and stored as the
reference code stores its ground truth: ``<references>/<key>/<n>.png`` (Wen et al.'s ``gt_images/<index>/*.png``;
``n`` counts the prompt file's rows of one key), RGB, resized only where ``resize`` sets a shorter side (null:
kept at its own size, as Wen et al. keep theirs; every metric resizes as its reference code does). Dead links go
to ``fetch_report.csv`` (url, key, HTTP status or error) beside the references; a dead link never stops the rest.
"""

from __future__ import annotations

import csv
import io
import shutil
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import requests
import requests.adapters
from PIL import Image

from memguard.fetch import manifest
from memguard.fetch.sources import safe_join
from memguard.runs.folder import atomic_path
from memguard.runs.prompt_files import Columns, read_prompts_file

REPORT = "fetch_report.csv"
MAX_BYTES = 64 * 2**20  # an image larger than this is refused (not a reference image)


@dataclass
class Job:
    url: str
    key: str
    n: int

    @property
    def name(self) -> str:
        return f"{self.key}/{self.n}.png"


def jobs(prompts_file: Path, column: str, key_field: str | None) -> list[Job]:
    """One job per URL of the prompt file's ``column`` (one URL, or a list of them: MemBench's ``urls``), the file
    read as ``prompts_file`` is (:func:`memguard.runs.prompt_files.read_prompts_file`: JSONL, CSV, parquet);
    ``key_field`` (references_per_prompt) names each prompt's folder, else the prompt's row index."""

    loaded = read_prompts_file(prompts_file, Columns(key=key_field))
    out: list[Job] = []
    count: dict[str, int] = defaultdict(int)
    for row, (fields, key) in enumerate(zip(loaded.fields, loaded.reference_keys)):
        cell = fields.get(column)
        key = key if key_field else str(row)
        for url in cell if isinstance(cell, list) else [cell]:
            if isinstance(url, str) and url.strip():
                out.append(Job(url.strip(), key, count[key]))
                count[key] += 1
    return out


def iri_to_uri(url: str) -> str:
    """Spaces and non-ASCII characters percent-encoded (what a browser sends); what is encoded stays."""
    parts = urlsplit(url.strip())
    host = parts.netloc.encode("idna").decode() if not parts.netloc.isascii() else parts.netloc
    safe = "/%:@!$&'()*+,;=~-._"
    return urlunsplit((parts.scheme, host, quote(parts.path, safe=safe), quote(parts.query, safe=safe + "?"),
                       quote(parts.fragment, safe=safe)))


def decode(data: bytes, resize: int | None) -> Image.Image:
    """The image in ``data``, fully decoded, as RGB (transparency on white); OSError/ValueError if it is not one."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            out = Image.new("RGB", rgba.size, (255, 255, 255))
            out.paste(rgba, mask=rgba.getchannel("A"))
        else:
            out = image.convert("RGB")
    if resize:
        w, h = out.size
        scale = resize / min(w, h)
        out = out.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    return out


class HostLimit:
    def __init__(self, per_host: int) -> None:
        self.per_host, self.lock, self.sems = per_host, threading.Lock(), {}

    def __call__(self, url: str) -> threading.Semaphore:
        host = urlsplit(url).netloc
        with self.lock:
            return self.sems.setdefault(host, threading.Semaphore(self.per_host))


def pooled_session(per_host: int) -> requests.Session:
    """One session for every thread: its connection pools (thread-safe) keep up to ``per_host`` open connections to
    each host, reused by whichever thread asks that host next."""
    session = requests.Session()
    session.headers["User-Agent"] = "memguard-fetch"
    adapter = requests.adapters.HTTPAdapter(pool_connections=256, pool_maxsize=per_host)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def get_one(job: Job, root: Path, settings: dict, limit: HostLimit, session: requests.Session) -> tuple[Job, str | None]:
    """Fetch, verify and store one image; (job, None) or (job, why it failed)."""
    url = iri_to_uri(job.url)
    why = None
    for attempt in range(settings["retries"] + 1):
        try:
            with limit(url):
                with session.get(url, timeout=settings["timeout"], stream=True) as response:
                    if response.status_code >= 500 and attempt < settings["retries"]:
                        why = f"HTTP {response.status_code}"
                        time.sleep(settings["backoff"] * 2**attempt)
                        continue
                    if response.status_code >= 400:
                        return job, f"HTTP {response.status_code}"
                    data = bytearray()
                    for chunk in response.iter_content(2**16):
                        data += chunk
                        if len(data) > MAX_BYTES:
                            return job, f"larger than {MAX_BYTES // 2**20} MiB"
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
            why = type(err).__name__
            if attempt == settings["retries"]:
                return job, why
            time.sleep(settings["backoff"] * 2**attempt)
        except requests.RequestException as err:  # an invalid URL and the like: dead, not retried
            return job, type(err).__name__
    else:
        return job, why
    try:
        image = decode(bytes(data), settings["resize"])
    except Exception as err:  # noqa: BLE001  (anything PIL cannot decode is not an image)
        kind = response.headers.get("Content-Type", "?").split(";")[0]
        return job, f"not an image ({kind}, {type(err).__name__})"
    path = safe_join(root, job.name, "references")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return job, None


def fetch_list(prompts_file: Path, column: str, key_field: str | None, root: Path, settings: dict,
               retry_dead: bool) -> str:
    """Fetch every prompt's image not yet there; write fetch_report.csv and the manifest; the summary line."""
    all_jobs = jobs(prompts_file, column, key_field)
    for job in all_jobs:  # a key or file name that would leave the folder: refused before any request
        safe_join(root, job.name, "references")
    report_path = root.parent / REPORT
    dead_before = read_dead(report_path)
    todo = [j for j in all_jobs if not (root / j.name).is_file() and (retry_dead or (j.url, j.key) not in dead_before)]
    dead: dict[tuple[str, str], str] = {k: v for k, v in dead_before.items() if not retry_dead}
    done: dict[str, dict] = {}
    # each distinct URL is asked for once, its image placed for every prompt naming it (MemBench: 7,260 rows, 151 URLs)
    fetched = {j.url: root / j.name for j in all_jobs if (root / j.name).is_file()}
    by_url: dict[str, list[Job]] = defaultdict(list)
    for job in todo:
        by_url[job.url].append(job)
    asked = [jobs_[0] for url, jobs_ in by_url.items() if url not in fetched]
    limit, session = HostLimit(settings["per_host"]), pooled_session(settings["per_host"])
    with session, ThreadPoolExecutor(settings["workers"]) as pool:
        results = dict((job.url, why) for job, why in pool.map(lambda j: get_one(j, root, settings, limit, session),
                                                               asked))
    for url, same in by_url.items():
        why = results.get(url)
        source = fetched.get(url, root / same[0].name)
        for job in same:
            if why is None:
                if root / job.name != source:
                    place(source, root / job.name)
                dead.pop((job.url, job.key), None)
                done[f"{root.name}/{job.name}"] = manifest.entry(root / job.name, job.url)
            else:
                dead[(job.url, job.key)] = why
    if done:
        manifest.update(root.parent, files=done)
    keys = {j.key for j in all_jobs}
    have = {k for k in keys if (root / k).is_dir() and any((root / k).iterdir())}
    rows = sorted((url, key, why) for (url, key), why in dead.items())
    with atomic_path(report_path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["url", "key", "status"])
            writer.writerows(rows)
    n_dead = len(keys - have)
    return (f"{len(have)} of {len(keys)} prompts have a reference; {n_dead} dead: {report_path}" if n_dead
            else f"{len(have)} of {len(keys)} prompts have a reference")


def place(source: Path, dest: Path) -> None:
    """A copy of an image already fetched, for another prompt that names the same URL (written whole or not at all)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        shutil.copyfile(source, tmp)


def read_dead(report_path: Path) -> dict[tuple[str, str], str]:
    try:
        with open(report_path, newline="", encoding="utf-8") as handle:
            return {(r["url"], r["key"]): r["status"] for r in csv.DictReader(handle)}
    except (OSError, KeyError):
        return {}


"""``memguard fetch``: download what ``memguard check`` would report missing for a config, from the sources its
``sources.<input>`` nodes name (memguard/fetch/sources.py), and nothing else. memguard never downloads at run
time: this is the one step that uses the network.

    memguard fetch scenario=webster500 metrics=paper            # the model, prompts, references and weights
    memguard fetch experiment=table4 fetch.dry_run=true         # what, from where, how many bytes
    memguard fetch scenario=webster500 fetch.only=[references]  # only these inputs

Each file is written as ``.part`` and renamed when whole (and its hash matches); each data, models or weights
folder gets a ``manifest.json`` (file, bytes, sha256, source, resolved revision, fetched at), which ``memguard
check`` reads to name files changed or removed since. Sources that cannot be reached are one line each (exit 2).
"""

from __future__ import annotations

import os
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from memguard.errors import UserError
from memguard.fetch import manifest
from memguard.fetch.http import FetchError, free_space
from memguard.fetch.sources import check_node, destination, fills, nodes, where


@dataclass
class Item:
    """One input to fetch: its source node, destination and why it is fetched."""

    key: str
    node: DictConfig
    dest: Path
    reason: str
    files: list[tuple[str, int | None]] = field(default_factory=list)  # (what, bytes) it will download

    @property
    def kind(self) -> str:
        return str(self.node.get("kind"))

    @property
    def root(self) -> Path:  # the folder whose manifest.json records it
        return self.dest.parent

    @property
    def folder(self) -> bool:  # whether the destination is a folder
        node = self.node
        return (self.kind == "hub" and not node.get("file")) or bool(node.get("unpack")) or self.kind == "url_list" \
            or bool(node.get("folder"))

    @property
    def recorded(self) -> dict[str, Any]:  # what the source's first fetch recorded (hash, revision)
        return manifest.read(self.root)["sources"].get(self.key, {})


def settings(cfg: DictConfig) -> dict[str, Any]:
    """The ``fetch`` node's download settings, typed (their defaults and meaning: conf/config.yaml)."""
    node = cfg.fetch
    return {"workers": int(node.workers), "per_host": int(node.per_host), "timeout": float(node.timeout),
            "retries": int(node.retries), "backoff": float(node.backoff), "resize": node.resize,
            "retry_dead": bool(node.retry_dead)}


# ---------------------------------------------------------------------------------------------------------------
# What is missing: the checks of ``memguard check``, one input at a time


def missing(cfg: DictConfig, key: str, node: DictConfig, dest: Path) -> str | None:
    """Why the input is to be fetched (what ``memguard check`` reports of it), or None where it is usable."""
    from memguard.check import Report, archive_problem, check_model

    kind = node.get("kind")
    target = fills(key, node)
    if key in ("model", "base_model") or target in ("model.path", "finetune.base_model"):
        report = Report()
        check_model(OmegaConf.create({"model": {"path": str(dest), "family": cfg.model.get("family")}}), report)
        if report.problems:
            return report.problems[0]
    elif kind == "url_list":
        return _missing_images(cfg, key, node, dest)
    elif kind in ("hub", "url", "gdrive", "manual", "made") and (node.get("unpack") or node.get("folder")
                                                                 or target == "references"):
        from memguard.evaluate import reference_files

        if not dest.is_dir() or not any(p.is_file() for p in dest.rglob("*")):
            return f"{target}={str(dest)!r} is not a folder of files"
        if target == "references":
            try:
                reference_files(dest)
            except UserError as err:
                return str(err)
    elif not dest.is_file():
        return f"{target}={str(dest)!r} is not a file"
    elif target.startswith("metrics.") and (problem := archive_problem(dest)) is not None:
        return f"{target}={str(dest)!r} {problem}"
    changed = manifest.changes(dest)
    if changed:
        return f"{target}: {'; '.join(changed[:3])}{' ...' if len(changed) > 3 else ''} since it was fetched"
    return None


def url_file(cfg: DictConfig, key: str, node: DictConfig) -> Path:
    """The file holding a url_list source's URLs: its ``file``, else ``prompts_file``."""
    file = node.get("file") or cfg.prompts_file
    if file is None:
        raise UserError(f"sources.{key}.kind=url_list needs prompts_file (the prompt file holding the URLs) or "
                        f"sources.{key}.file")
    return Path(str(file)).expanduser()


def _missing_images(cfg: DictConfig, key: str, node: DictConfig, dest: Path) -> str | None:
    from memguard.fetch.images import REPORT, jobs, read_dead

    prompts = url_file(cfg, key, node)
    if not prompts.is_file():
        return "the prompt file, which holds the URLs, is not there yet"
    dead = set() if settings(cfg)["retry_dead"] else set(read_dead(dest.parent / REPORT))
    todo = [j for j in jobs(prompts, str(node.get("column", "url")), cfg.references_per_prompt)
            if not (dest / j.name).is_file() and (j.url, j.key) not in dead]
    changed = manifest.changes(dest)
    if todo or changed:
        return f"{len(todo)} image(s) not fetched yet" + (f", {len(changed)} changed since fetched" if changed else "")
    return None


def plan(cfg: DictConfig) -> tuple[list[Item], list[str], list[str]]:
    """(items to fetch, inputs that cannot be fetched (one line each), notes)."""
    sources = nodes(cfg)
    only = OmegaConf.to_container(cfg.fetch.only) if cfg.get("fetch") and cfg.fetch.get("only") else None
    if only is not None:
        unknown = [k for k in only if k not in sources]
        if unknown:
            raise UserError(f"fetch.only names {', '.join(map(str, unknown))}, which scenario={cfg.scenario.name} has "
                            f"no source for; its sources: {', '.join(sources) or 'none'}")
    items, cannot, notes = [], [], []
    model_missing = None
    for key, node in sources.items():
        if only is not None and key not in only:
            continue
        check_node(key, node)
        dest = destination(cfg, key, node)
        if dest is None:
            continue
        if key == "base_model" and not model_missing:  # only to make a fine-tuned model that is not there
            continue
        reason = missing(cfg, key, node, dest)
        if key == "model":
            model_missing = reason
        if reason is None:
            continue
        if node.kind == "made":
            notes.append(f"{key}: made, not fetched: {node.get('note')}")
        elif node.kind == "manual":
            cannot.append(f"sources.{key}: {reason}; memguard cannot fetch it: {node.get('note')}")
        else:
            items.append(Item(key, node, dest, reason))
    return items, cannot, notes


# ---------------------------------------------------------------------------------------------------------------
# Sizes, then the fetch


def describe(cfg: DictConfig, item: Item) -> None:
    """Fill ``item.files``: what will be downloaded, with the announced sizes (None: not announced)."""
    from memguard.fetch import http, hub

    node, s = item.node, settings(cfg)
    if item.kind == "hub":
        item.files = hub.plan(item.key, node, item.dest, node.get("revision") or item.recorded.get("revision"))
    elif item.kind == "url" or (item.kind == "gdrive" and node.get("url")):
        item.files = [(str(node.url), http.probe(str(node.url), s["timeout"]))]
    elif item.kind == "gdrive":
        item.files = [(where(node), None)]  # Drive announces no size before the download
    elif item.kind == "url_list":
        from memguard.fetch.images import jobs

        prompts = url_file(cfg, item.key, node)
        urls = jobs(prompts, str(node.get("column", "url")), cfg.references_per_prompt) if prompts.is_file() else []
        item.files = [(f"{len(urls)} image URL(s) of {prompts.name}", None)]


def need_bytes(item: Item) -> int:
    known = sum(n or 0 for _, n in item.files)
    return known * 2 if item.node.get("unpack") else known  # the archive and what it unpacks to


def check_space(items: list[Item]) -> None:
    """Refused before the first byte where the announced sizes do not fit the free disk."""
    by_disk: dict[Path, list[Item]] = defaultdict(list)
    for item in items:
        parent = item.dest.absolute()
        while not parent.exists():
            parent = parent.parent
        by_disk[parent].append(item)
    totals: dict[int, tuple[int, Path]] = {}
    for parent, group in by_disk.items():
        dev = parent.stat().st_dev
        total, _ = totals.get(dev, (0, parent))
        totals[dev] = (total + sum(need_bytes(i) for i in group), parent)
    for total, parent in totals.values():
        free = free_space(parent)
        if total > free:
            raise UserError(f"not enough free disk: the sources announce {total / 2**30:.2f} GiB, {free / 2**30:.2f} GiB "
                            f"free on {parent}; nothing was fetched; free space, or point paths.data_dir / "
                            "paths.models_dir / paths.weights_dir at another disk")


def _size(n: int | None) -> str:
    if n is None:
        return "size not announced"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def fetch_item(cfg: DictConfig, item: Item) -> str:
    """Fetch one input; a line saying what was done."""
    from memguard.fetch import http, hub

    node, key, s = item.node, item.key, settings(cfg)
    for line in manifest.changes(item.dest):  # changed or removed since fetched: fetched again from the start
        name = line.split(" ")[0]
        (item.root / name).unlink(missing_ok=True)
    if item.kind == "hub":
        pinned = node.get("revision")
        recorded = item.recorded.get("revision")
        commit, files = hub.fetch(key, node, item.dest, pinned or recorded)
        source = f"https://huggingface.co/{node.repo}"
        entries = {f.relative_to(item.root).as_posix(): manifest.entry(f, f"{source}/{f.relative_to(item.dest).as_posix()}"
                                                                       if item.folder else f"{source}/{node.file}", commit)
                   for f in files}
        manifest.update(item.root, files=entries, sources={key: {"repo": str(node.repo), "revision": commit,
                                                                "fetched_at": manifest.now()}})
        return f"{key}: {len(files)} file(s) from {source} at {commit} -> {item.dest}"
    if item.kind == "url_list":
        from memguard.fetch.images import fetch_list

        if cfg.references_per_prompt is None:
            raise UserError(f"sources.{key}.kind=url_list needs references_per_prompt (the prompt field naming each "
                            "prompt's folder)")
        return f"{key}: " + fetch_list(url_file(cfg, key, node), str(node.get("column", "url")),
                                       str(cfg.references_per_prompt), item.dest, s, s["retry_dead"])
    # url and gdrive: one file, or an archive unpacked into a folder
    sha256 = node.get("sha256") or item.recorded.get("sha256")
    unpack = node.get("unpack")
    target = item.root / f".{item.dest.name}.{unpack}" if unpack else item.dest
    item.root.mkdir(parents=True, exist_ok=True)
    if item.kind == "gdrive" and node.get("folder"):  # a Drive folder, whole, as the destination folder
        return _gdrive_folder(item, s)
    if item.kind == "gdrive":
        digest = _gdrive(node, target, sha256, s)
    else:
        digest = http.download(str(node.url), target, sha256=sha256, sha256_prefix=node.get("sha256_prefix"),
                               timeout=s["timeout"], retries=s["retries"], backoff=s["backoff"])
    origin = where(node)
    if unpack:
        files = http.unpack(target, unpack, node.get("subfolder"), item.dest, key)
        target.unlink()
        old = [n for n in manifest.read(item.root)["files"] if n.startswith(item.dest.name + "/")]
        manifest.update(item.root, drop=old, files={f.relative_to(item.root).as_posix(): manifest.entry(f, origin)
                                                    for f in files},
                        sources={key: {"sha256": digest, "source": origin, "fetched_at": manifest.now()}})
        return f"{key}: {len(files)} file(s) unpacked from {origin} -> {item.dest}"
    manifest.update(item.root, files={item.dest.name: manifest.entry(item.dest, origin, sha256=digest)},
                    sources={key: {"sha256": digest, "source": origin, "fetched_at": manifest.now()}})
    return f"{key}: {item.dest} ({_size(item.dest.stat().st_size)}) from {origin}"


def _gdrive(node: DictConfig, target: Path, sha256: str | None, s: dict[str, Any]) -> str:
    """A Drive file (gdown: Drive's confirmation page, resume) into ``target``; its sha256."""
    import gdown

    from memguard.fetch.http import check_hash, part_of

    out = target.with_name(target.name + ".gdown")
    try:
        gdown.download(url=str(node.url) if node.get("url") else None, id=None if node.get("url") else str(node.id),
                       output=str(out), quiet=True, resume=True, timeout=s["timeout"], retries=s["retries"])
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001  (gdown's errors: the source could not be fetched)
        raise FetchError(f"{where(node)} could not be fetched ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:160] if str(err) else ''})") from err
    digest = manifest.sha256_of(out)
    try:
        check_hash(target.name, digest, sha256, node.get("sha256_prefix"), part_of(target))
    except UserError:
        os.replace(out, part_of(target))
        raise
    os.replace(out, target)
    return digest


def _gdrive_folder(item: Item, s: dict[str, Any]) -> str:
    """A Drive folder (gdown.download_folder) into a staging folder, renamed to the destination when whole."""
    import gdown

    staging = item.root / f".{item.dest.name}.gdrive"
    try:
        gdown.download_folder(id=str(item.node.id), output=str(staging), quiet=True, resume=True,
                              timeout=s["timeout"], retries=s["retries"])
    except Exception as err:  # noqa: BLE001
        raise FetchError(f"{where(item.node)} could not be fetched ({type(err).__name__})") from err
    if item.dest.exists():
        shutil.rmtree(item.dest)
    os.replace(staging, item.dest)
    files = sorted(p for p in item.dest.rglob("*") if p.is_file())
    manifest.update(item.root, files={f.relative_to(item.root).as_posix(): manifest.entry(f, where(item.node))
                                      for f in files})
    return f"{item.key}: {len(files)} file(s) from {where(item.node)} -> {item.dest}"


def fetch(cfg: DictConfig) -> list[str]:
    """``memguard fetch``: the lines it printed."""
    out: list[str] = []

    def say(line: str) -> None:
        out.append(line)
        print(line, flush=True)

    items, cannot, notes = plan(cfg)
    for line in notes:
        say(line)
    if not items and not cannot:
        say(f"memguard fetch: nothing to fetch; every input of scenario={cfg.scenario.name} that has a source is "
            "present")
        return out
    failures = list(cannot)
    ready = []
    for item in items:
        try:
            describe(cfg, item)
            ready.append(item)
        except FetchError as err:
            failures.append(f"sources.{item.key}: {err}")
    if cfg.fetch.get("dry_run"):
        for item in ready:
            say(f"{item.key} ({item.reason}): {item.kind} {where(item.node)} -> {item.dest}")
            for what, n in item.files:
                say(f"    {what}  {_size(n)}")
        total = sum(need_bytes(i) for i in ready)
        say(f"memguard fetch (dry run): {len(ready)} input(s), {total / 2**30:.2f} GiB announced"
            + (" (some sizes not announced)" if any(n is None for i in ready for _, n in i.files) else ""))
        if failures:
            lines = "\n".join(f"  - {f}" for f in failures)
            raise UserError(f"{len(failures)} source(s) cannot be fetched:\n{lines}")
        return out
    check_space(ready)
    for item in ready:
        try:
            say(fetch_item(cfg, item))
        except FetchError as err:
            failures.append(f"sources.{item.key}: {err}")
    if failures:
        lines = "\n".join(f"  - {f}" for f in failures)
        raise UserError(f"{len(failures)} source(s) not fetched (what was fetched is whole; run again to resume):\n"
                        f"{lines}")
    say("memguard fetch: done; `memguard check` with the same overrides checks every input")
    return out


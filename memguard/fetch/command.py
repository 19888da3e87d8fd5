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

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from memguard.errors import UserError
from memguard.fetch import http, hub, manifest
from memguard.fetch.assemble import plan as assembled_plan
from memguard.fetch.derive import make
from memguard.fetch.fetchers import fetch_from
from memguard.fetch.http import FetchError, free_space, human, part_of
from memguard.fetch.images import REPORT, fetch_list, jobs, read_dead
from memguard.fetch.sources import check_node, destination, fills, locations, noted_size, nodes, origin, where


@dataclass
class Item:
    """One input to fetch: its source node, destination and why it is fetched."""

    key: str
    node: DictConfig
    dest: Path
    reason: str
    files: list[tuple[str, int | None]] = field(default_factory=list)  # (what, bytes) it will download
    unreachable: str | None = None  # why its size could not be asked for (a dry run lists it all the same)
    error: Exception | None = None  # the error that said so

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

    def recorded(self, node: DictConfig | None = None) -> dict[str, Any]:
        """What the first fetch of this source from ``node``'s origin (default: its own) recorded: a hash, a
        revision. Per origin: another scenario's source of the same name in this folder is another record."""
        return manifest.recorded(self.root, self.key, origin(node if node is not None else self.node))

    def expected_sha256(self, node: DictConfig) -> str | None:
        """The sha256 a file from ``node`` (the source or one of its mirrors) must have: pinned, else recorded at
        the first fetch from the source or from that mirror (a mirror serves the same bytes)."""
        return self.node.get("sha256") or node.get("sha256") or self.recorded().get("sha256") \
            or self.recorded(node).get("sha256")


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
    # start-up: check's model folder checks import torch
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
    elif kind in ("hub", "url", "gdrive", "derived", "manual", "made") and (node.get("unpack") or node.get("folder")
                                                                 or target == "references"
                                                                 or (kind == "hub" and not node.get("file"))):
        from memguard.evaluate import reference_files  # start-up: evaluate imports torch and pandas

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
        if key == "base_model" and not (model_missing and sources.get("model") is not None
                                        and sources["model"].get("kind") == "made"):
            continue  # only to make a fine-tuned model that is not there
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
    """Fill ``item.files``: what will be downloaded, with the announced sizes (None: not announced). Where the
    host cannot be asked (offline, down), the size its note gives and ``item.unreachable`` (why)."""

    node, s = item.node, settings(cfg)
    try:
        if item.kind == "hub":
            item.files = hub.plan(item.key, node, item.dest, node.get("revision") or item.recorded().get("revision"))
        elif item.kind == "url" or (item.kind == "gdrive" and node.get("url")):
            item.files = [(str(node.url), http.probe(str(node.url), s["timeout"]))]
        elif item.kind == "gdrive":
            item.files = [(where(node), noted_size(node))]  # Drive announces no size before the download
        elif item.kind == "derived":
            item.files = [(f"written from what sources.{node.get('from')} fetches", 0)]
        elif item.kind == "assembled":
            item.files = assembled_plan(item.node)
        elif item.kind == "url_list":
            prompts = url_file(cfg, item.key, node)
            if prompts.is_file():
                urls = jobs(prompts, str(node.get("column", "url")), cfg.references_per_prompt)
                item.files = [(f"{len({j.url for j in urls})} image URL(s) of {prompts.name}", None)]
            else:
                item.files = [(f"the image URLs of {prompts.name}, counted once that file is fetched", None)]
    except (FetchError, UserError) as err:
        item.unreachable, item.error = str(err), err
        item.files = [(where(node), noted_size(node))]


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
            raise UserError(f"not enough free disk: the sources announce {human(total)}, {human(free)} "
                            f"free on {parent}; nothing was fetched; free space, or point paths.data_dir / "
                            "paths.models_dir / paths.weights_dir at another disk")


def fetch_item(cfg: DictConfig, item: Item) -> str:
    """Fetch one input from its source, else from each of its ``mirrors`` in turn (the same checksum rules: a
    location serving other bytes is refused, and the next is tried); a line saying what was done."""

    s = settings(cfg)
    if item.kind == "derived":
        source = nodes(cfg).get(str(item.node.get("from")))
        folder = destination(cfg, str(item.node.get("from")), source) if source is not None else None
        if folder is None:
            raise UserError(f"sources.{item.key}.from={item.node.get('from')!r} names no source of this config")
        return make(item.node.get("make"), item.key, folder, item.dest)
    for line in manifest.changes(item.dest):  # changed or removed since fetched: fetched again from the start
        name = line.split(" ")[0]
        (item.root / name).unlink(missing_ok=True)
    tried: list[tuple[DictConfig, Exception]] = []
    places = locations(item.node)
    for node in places:
        try:
            line = fetch_from(item, node, s, url_list=lambda n: _url_list(cfg, item, n))
            return line + (f" (mirror {len(tried)} of sources.{item.key}; the source: {tried[0][1]})" if tried else "")
        except (FetchError, UserError) as err:
            if len(places) == 1:
                raise
            unpack = node.get("unpack") or ("auto" if node.get("folder") and node.get("url") else None)
            part = part_of(item.root / f".{item.dest.name}.{unpack}" if unpack else item.dest)
            if isinstance(err, UserError) and part.exists():  # other bytes: not resumed from by the next location
                part.unlink()
                err = UserError(str(err).replace(f"left as {part} (delete it to fetch again from the start)",
                                                 "not kept"))
            tried.append((node, err))
    lines = "; then ".join(f"{where(n)}: {e}" for n, e in tried)
    raise FetchError(f"not fetched from any of its {len(places)} locations ({lines})",
                     resumable=any(getattr(e, "resumable", False) for _, e in tried))


def _url_list(cfg: DictConfig, item: Item, node: DictConfig) -> str:
    if cfg.references_per_prompt is None:
        raise UserError(f"sources.{item.key}.kind=url_list needs references_per_prompt (the prompt field naming each "
                        "prompt's folder)")
    s = settings(cfg)
    return fetch_list(url_file(cfg, item.key, node), str(node.get("column", "url")), str(cfg.references_per_prompt),
                      item.dest, s, s["retry_dead"])


def failed(key: str, err: Exception) -> tuple[str, bool]:
    """(one line, whether running again may get it)."""
    text = str(err)
    return (text if text.startswith(f"sources.{key}") else f"sources.{key}: {text}"), getattr(err, "resumable", False)


def fetch(cfg: DictConfig) -> list[str]:
    """``memguard fetch``: the lines it printed. Every failure is one line of the error at the end, whatever
    stopped early; what was fetched is whole."""
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
    failures: list[tuple[str, bool]] = [(line, False) for line in cannot]
    for item in items:
        describe(cfg, item)
    if cfg.fetch.get("dry_run"):
        for item in items:
            say(f"{item.key} ({item.reason}): {item.kind} {where(item.node)} -> {item.dest}")
            for what, n in item.files:
                noted = item.unreachable is not None and n is not None
                say(f"    {what}  {human(n) if not noted else 'about ' + human(n) + ' (its note)'}")
            if item.unreachable:
                say(f"    not reachable now: {item.unreachable}")
        total = sum(need_bytes(i) for i in items)
        unknown = any(n is None for i in items for _, n in i.files)
        say(f"memguard fetch (dry run): {len(items)} input(s), {human(total)} announced or noted"
            + (" (some sizes not announced)" if unknown else "")
            + (f"; {sum(i.unreachable is not None for i in items)} not reachable now" if any(i.unreachable for i in items)
               else ""))
        if failures:
            lines = "\n".join(f"  - {f}" for f, _ in failures)
            raise UserError(f"{len(failures)} source(s) cannot be fetched:\n{lines}")
        return out
    check_space([i for i in items if i.unreachable is None])
    for item in sorted(items, key=lambda i: i.kind == "derived"):  # what comes with another source: after it
        if item.unreachable is not None and len(locations(item.node)) == 1:  # asked already, no mirror to try
            failures.append(failed(item.key, item.error or FetchError(item.unreachable)))
            continue
        try:
            say(fetch_item(cfg, item))
        except (FetchError, UserError) as err:
            failures.append(failed(item.key, err))
    if failures:
        lines = "\n".join(f"  - {f}{'; running the same command again resumes it' if again else ''}"
                          for f, again in failures)
        raise UserError(f"{len(failures)} source(s) not fetched (what was fetched is whole):\n{lines}")
    say("memguard fetch: done; `memguard check` with the same overrides checks every input")
    return out

"""Where each input of a scenario comes from: its ``sources.<input>`` config node, read as data.

A node names a ``kind`` and how to get it:

- ``hub``: ``repo``, ``revision``, ``allow_patterns`` (optional ``variant``; ``file``: one file of the repository,
  saved under the destination's own name);
- ``url``: ``url``, ``sha256`` (or ``sha256_prefix``), optional ``unpack: zip|tar``, ``subfolder`` (the
  archive's folder that becomes the destination) and ``members`` (glob patterns: only the members that match are
  unpacked, e.g. one JSON file of COCO's annotation archive);
- ``gdrive``: ``id`` (a file; ``folder: true`` for a Drive folder), then as ``url`` (``url``, when set, is fetched
  through the same Drive client instead: mirrors and tests);
- ``url_list``: ``column`` of the prompt file holds each prompt's image URL (or a list of URLs); the images go to
  one folder per prompt key (``references_per_prompt``), as the scenario reads them; ``file`` (optional) names
  another file holding the URLs and keys (ren_sd2_219: SAIL's ``sd2_mem.jsonl``, its ``prompt_join.file``);
- ``assembled``: a runnable diffusers folder put together from other sources: ``part`` (a node of the kinds above:
  the published piece, e.g. a fine-tuned UNet on Drive) and ``base`` (a hub node: the model the piece belongs in);
  a part that is a whole diffusers folder is used as it is (memguard/fetch/assemble.py);
- ``derived``: comes with another source (``from``: its name), fetched after every other; ``make`` writes it from
  that source's folder (``captions_json``, ``captions_txt``: memguard/fetch/derive.py), null: only looked for there;
- ``manual`` / ``made``: nothing to fetch; ``note`` says how to get it (``made``: the command that makes it).

Any fetched node may list ``mirrors``: other locations of the same thing, each a mapping of the fields that differ
(``{repo: ...}``, ``{url: ...}``, ``{kind: url, url: ...}``), tried in order when the source fails, under the same
checksum rules (a pinned or recorded sha256 holds for every location).

Every node has a ``note`` (licence, gating) and fills one config key (``fills``, by default from its name:
``model`` -> ``model.path``, ``similarity`` -> ``metrics.similarity.path``, ``nemo_statistics`` -> ``nemo.statistics``
(conf/config.yaml: NeMo's statistics file, for ``memguard nemo-localize``), ...): that key is the destination; a
source whose key is null (not used by the config) is not fetched.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from memguard.errors import UserError

# the config key each source fills, by its name; a node's ``fills`` overrides it
FILLS = {"model": "model.path", "base_model": "finetune.base_model", "prompts_file": "prompts_file",
         "control_prompts_file": "control_prompts_file", "prompt_join": "prompt_join.file", "references": "references", "similarity": "metrics.similarity.path",
         "alignment": "metrics.alignment.path", "fid": "metrics.fid.path",
         "nemo_statistics": "nemo.statistics", "aesthetic": "metrics.aesthetic.path",
         "aesthetic_clip": "metrics.aesthetic.clip_path", "diversity": "metrics.diversity.path",
         "dino": "metrics.dino.path"}
ORDER = ("model", "base_model", "prompts_file", "control_prompts_file", "prompt_join", "references", "similarity", "alignment", "fid",
         "aesthetic", "aesthetic_clip", "diversity", "dino", "nemo_statistics")
KINDS = ("hub", "url", "gdrive", "url_list", "assembled", "derived", "manual", "made")
SIZE_UNITS = {"kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def nodes(cfg: DictConfig) -> dict[str, Any]:
    """The ``sources`` nodes, in fetch order (the prompt file before the references that its URLs name)."""
    sources = cfg.get("sources") or {}
    keys = sorted(sources, key=lambda k: (ORDER.index(k) if k in ORDER else len(ORDER), k))
    return {k: sources[k] for k in keys if sources[k] is not None}


def fills(key: str, node: Any) -> str:
    if isinstance(node, DictConfig) and node.get("fills"):
        return str(node.fills)
    return FILLS.get(key, key)


def destination(cfg: DictConfig, key: str, node: Any) -> Path | None:
    """The path the source fills (the value of its config key), or None where the config does not use it."""
    value = OmegaConf.select(cfg, fills(key, node), default=None, throw_on_missing=False)
    return None if value is None else Path(str(value)).expanduser()


def with_fields(node: DictConfig, **fields: Any) -> DictConfig:
    """A copy of ``node`` with ``fields`` set (new ones too)."""
    return OmegaConf.create({**OmegaConf.to_container(node, resolve=True), **fields})


def locations(node: DictConfig) -> list[DictConfig]:
    """The node itself, then each of its ``mirrors`` (the node with the mirror's fields over it)."""
    own = OmegaConf.create({k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "mirrors"})
    out = [own]
    for mirror in node.get("mirrors") or []:
        fields = OmegaConf.to_container(mirror, resolve=True)
        if fields.get("url") and own.get("kind") == "gdrive" and "id" not in fields:
            fields["id"] = None  # a URL mirror of a Drive file is fetched from its URL
        out.append(with_fields(own, **fields))
    return out


def noted_size(node: DictConfig) -> int | None:
    """The size a node's note gives ("about 5.2 GB"), in bytes; None where it gives none."""

    match = re.search(r"about ([\d.]+) ?(kB|KB|MB|GB|TB)", str(node.get("note") or ""))
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2)]) if match else None


def origin(node: Any) -> str:
    """The repository or URL a node fetches from: what ``manifest.json`` keeps its records under."""
    if not isinstance(node, DictConfig):
        return str(node)
    kind = node.get("kind")
    if kind == "hub":
        return str(node.repo)
    if kind == "url" or (kind == "gdrive" and node.get("url")):
        return str(node.url)
    if kind == "gdrive":
        return where(node)
    return str(kind)


def where(node: Any) -> str:
    """Where a source's files come from, in a few words."""
    if not isinstance(node, DictConfig):
        return str(node)
    kind = node.get("kind")
    if kind == "hub":
        what = f"{node.file} of " if node.get("file") else ""
        return f"{what}https://huggingface.co/{node.repo} (revision {node.get('revision') or 'main'})"
    if kind == "url":
        return str(node.url)
    if kind == "gdrive":
        if node.get("url"):
            return str(node.url)
        return f"https://drive.google.com/{'drive/folders' if node.get('folder') else 'file/d'}/{node.id}"
    if kind == "assembled":
        return f"{where(node.part)} into {where(node.base)}"
    if kind == "derived":
        return f"what sources.{node.get('from')} fetches" + (f" ({node.make})" if node.get("make") else "")
    if kind == "url_list":
        return (f"the image URLs in the {node.get('column', 'url')!r} column of "
                + (Path(str(node.file)).name if node.get("file") else "the prompt file"))
    return str(node.get("note") or kind)


def prose(cfg: DictConfig, key: str) -> str:
    """What ``memguard check`` says after a missing input: where it comes from and how to get it."""
    node = (cfg.get("sources") or {}).get(key)
    if node is None:
        return ""
    if not isinstance(node, DictConfig):
        return f"; get it: {node}"
    kind, note = node.get("kind"), node.get("note")
    if kind in ("manual", "made"):
        return f"; get it: {note}"
    text = f"; get it: `memguard fetch` (the same overrides) fetches it from {where(node)}"
    return text + (f" ({note})" if note else "")


def check_node(key: str, node: Any) -> None:
    """A UserError naming the field that a node of its kind lacks."""
    if not isinstance(node, DictConfig):
        raise UserError(f"sources.{key} is prose only ({str(node)[:80]!r}); memguard fetch needs a node with a kind")
    kind = node.get("kind")
    if kind not in KINDS:
        raise UserError(f"sources.{key}.kind={kind!r} is not a source kind; use one of {', '.join(KINDS)}")
    need = {"hub": ("repo",), "url": ("url",), "gdrive": (), "url_list": ("column",),
            "assembled": ("part", "base"), "derived": ("from",)}.get(kind, ())
    for field in need:
        if not node.get(field):
            raise UserError(f"sources.{key}.{field} is not set (kind={kind})")
    if kind == "gdrive" and not (node.get("id") or node.get("url")):
        raise UserError(f"sources.{key}.id is not set (kind=gdrive): give the Drive file or folder id")
    if node.get("unpack") not in (None, "zip", "tar", "auto"):
        raise UserError(f"sources.{key}.unpack={node.unpack!r}: use zip, tar, auto (either, by its content) or null")
    if kind == "assembled":
        check_node(f"{key}.part", node.part)
        check_node(f"{key}.base", node.base)
    mirrors = node.get("mirrors")
    if mirrors is not None and not (OmegaConf.is_list(mirrors) and all(isinstance(m, DictConfig) for m in mirrors)):
        raise UserError(f"sources.{key}.mirrors={mirrors!r}: give a list of mappings, each the fields that differ "
                        f"from the source, e.g. sources.{key}.mirrors=[{{url: https://...}}]")


def safe_join(root: Path, name: str, key: str) -> Path:
    """``root/name``, refused (a UserError) where ``name`` would leave ``root`` (``..``, an absolute path)."""
    name = str(name)
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts or "\\" in name or "\x00" in name:
        raise UserError(f"sources.{key}: the destination {name!r} would leave {root}; refused")
    path = root / name
    if not path.resolve().is_relative_to(root.resolve()):
        raise UserError(f"sources.{key}: the destination {name!r} would leave {root}; refused")
    return path

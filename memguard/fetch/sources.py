"""Where each input of a scenario comes from: its ``sources.<input>`` config node, read as data.

A node names a ``kind`` and how to get it:

- ``hub``: ``repo``, ``revision``, ``allow_patterns`` (optional ``variant``; ``file``: one file of the repository,
  saved under the destination's own name);
- ``url``: ``url``, ``sha256`` (or ``sha256_prefix``), optional ``unpack: zip|tar`` and ``subfolder`` (the
  archive's folder that becomes the destination);
- ``gdrive``: ``id`` (a file; ``folder: true`` for a Drive folder), then as ``url`` (``url``, when set, is fetched
  through the same Drive client instead: mirrors and tests);
- ``url_list``: ``column`` of the prompt file holds each prompt's image URL (or a list of URLs); the images go to
  one folder per prompt key (``references_per_prompt``), as the scenario reads them; ``file`` (optional) names
  another file holding the URLs and keys (ren_sd2_219: SAIL's ``sd2_mem.jsonl``, its ``prompt_join.file``);
- ``manual`` / ``made``: nothing to fetch; ``note`` says how to get it (``made``: the command that makes it).

Every node has a ``note`` (licence, gating) and fills one config key (``fills``, by default from its name:
``model`` -> ``model.path``, ``similarity`` -> ``metrics.similarity.path``, ``nemo_statistics`` -> ``nemo.statistics``
(conf/config.yaml: NeMo's statistics file, for ``memguard nemo-localize``), ...): that key is the destination; a
source whose key is null (not used by the config) is not fetched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from memguard.errors import UserError

# the config key each source fills, by its name; a node's ``fills`` overrides it
FILLS = {"model": "model.path", "base_model": "finetune.base_model", "prompts_file": "prompts_file",
         "control_prompts_file": "control_prompts_file", "prompt_join": "prompt_join.file", "references": "references", "similarity": "metrics.similarity.path",
         "alignment": "metrics.alignment.path", "fid": "metrics.fid.path",
         "nemo_statistics": "nemo.statistics"}
ORDER = ("model", "base_model", "prompts_file", "control_prompts_file", "prompt_join", "references", "similarity", "alignment", "fid",
         "nemo_statistics")
KINDS = ("hub", "url", "gdrive", "url_list", "manual", "made")


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
    need = {"hub": ("repo",), "url": ("url",), "gdrive": (), "url_list": ("column",)}.get(kind, ())
    for field in need:
        if not node.get(field):
            raise UserError(f"sources.{key}.{field} is not set (kind={kind})")
    if kind == "gdrive" and not (node.get("id") or node.get("url")):
        raise UserError(f"sources.{key}.id is not set (kind=gdrive): give the Drive file or folder id")
    if node.get("unpack") not in (None, "zip", "tar"):
        raise UserError(f"sources.{key}.unpack={node.unpack!r}: use zip, tar or null")


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

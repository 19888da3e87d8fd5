"""``kind: assembled``: a runnable diffusers folder put together from what was published.

The published piece (``part``: a Drive file or folder, a URL, a hub repository) is fetched into a staging folder
and read for one of the layouts the authors' loading code accepts:

- a diffusers folder (``model_index.json`` beside its components; SonyResearch/mitigating_memorization
  generate_test_dataset_stp.py l. 104-116 loads every component from ``--pretrained_model_name_or_path``), as a
  folder, inside a folder, or packed as a zip or tar: used as it is;
- a UNet folder (``config.json`` naming ``UNet2DConditionModel`` beside its weights; their README l. 41 passes
  ``--unet_path checkpoint-20000/unet`` of the Drive folder, loaded by
  generate_test_dataset-opposite_guidance.py l. 103-106 over SD 1.4's other components), likewise: put into a
  copy of ``base`` (a hub node) in place of its ``unet/``.

Anything else is refused in one line naming what was found and what was expected; ``part.subfolder`` picks one
where several candidates are found. The folder is renamed into place only when whole, and the manifest records
both origins (the part's sha256 or revision, the base's commit) under the source's name.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from memguard.errors import UserError
from memguard.fetch import manifest
from memguard.fetch.http import archive_kind, unpack
from memguard.fetch.sources import noted_size, origin, where, with_fields

UNET_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.fp16.safetensors")
EXPECTED = ("a diffusers folder (model_index.json and its components), a UNet folder (config.json of a "
            "UNet2DConditionModel and diffusion_pytorch_model.*), a folder holding one, or a zip/tar of either")


def plan(node: DictConfig) -> list[tuple[str, int | None]]:
    """What an assembled source downloads, with the sizes the notes give (Drive announces none)."""
    return [(f"the part: {where(node.part)}", noted_size(node.part)),
            (f"the base, where the part is a UNet only: {where(node.base)}", noted_size(node.base))]


def _is_unet(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return config.get("_class_name") == "UNet2DConditionModel" and any((folder / w).is_file() for w in UNET_WEIGHTS)


def _found(root: Path) -> str:
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
    return ", ".join(names[:8]) + (f" ... ({len(names)} entries)" if len(names) > 8 else "") if names else "nothing"


def find_model(root: Path, key: str, subfolder: str | None = None) -> tuple[str, Path]:
    """("pipeline", folder) or ("unet", folder) in ``root`` (archives in it unpacked first); a UserError naming
    what was found and what was expected otherwise."""
    if subfolder:
        root = root / subfolder
        if not root.is_dir():
            raise UserError(f"sources.{key}.part.subfolder={subfolder!r} is not a folder of the fetched part")
    for archive in [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in (".zip", ".tar", ".tgz", ".gz")
                    and archive_kind(p)]:
        unpack(archive, "auto", None, archive.with_name(archive.name + ".d"), key)
        archive.unlink()
    pipelines = sorted((p.parent for p in root.rglob("model_index.json")), key=lambda p: len(p.parts))
    if pipelines:
        top = [p for p in pipelines if not any(q != p and p.is_relative_to(q) for q in pipelines)]
        if len(top) > 1:
            raise UserError(f"sources.{key}.part holds {len(top)} diffusers folders "
                            f"({', '.join(p.relative_to(root).as_posix() for p in top[:4])}); pick one with "
                            f"sources.{key}.part.subfolder=NAME")
        return "pipeline", top[0]
    unets = sorted(p.parent for p in root.rglob("config.json") if _is_unet(p.parent))
    if len(unets) > 1:
        raise UserError(f"sources.{key}.part holds {len(unets)} UNet folders "
                        f"({', '.join(p.relative_to(root).as_posix() for p in unets[:4])}); pick one with "
                        f"sources.{key}.part.subfolder=NAME")
    if unets:
        return "unet", unets[0]
    raise UserError(f"sources.{key}.part holds {_found(root)}; expected {EXPECTED}; refused, nothing was written")


def assemble(item: Any, node: DictConfig, s: dict[str, Any], fetch_from: Callable[..., str]) -> str:
    """Fetch ``node.part`` (and ``node.base`` where the part is a UNet only) with ``fetch_from``
    (:func:`memguard.fetch.fetchers.fetch_from`) and put the model folder in place."""
    Item = type(item)  # noqa: N806  (the part and the base are fetched as inputs of their own, into staging)
    key = item.key
    staging = item.root / f".{item.dest.name}.assemble"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        # 1. the published part, unpacked where it is one archive
        part = node.part
        if part.get("kind") in ("url", "gdrive") and not part.get("folder") and not part.get("unpack"):
            part = with_fields(part, unpack="auto")
        sha256 = part.get("sha256") or manifest.recorded(item.root, key, origin(part)).get("sha256")
        if sha256:
            part = with_fields(part, sha256=sha256)
        fetch_from(Item(f"{key}.part", part, staging / "part", ""), part, s)
        got = manifest.read(staging)["sources"].get(f"{key}.part", {}).get(origin(part), {})
        # 2. what it holds
        unpacked = part.get("url") if part.get("folder") else part.get("unpack")  # subfolder applied already
        layout, found = find_model(staging / "part", key, None if unpacked else part.get("subfolder"))
        base_record: dict[str, Any] = {}
        if layout == "pipeline":
            model = found
        else:  # 3. a UNet: into a copy of the base model
            base = node.base
            revision = base.get("revision") or manifest.recorded(item.root, key, origin(base)).get("revision")
            if revision and not base.get("revision"):
                base = with_fields(base, revision=revision)
            fetch_from(Item(f"{key}.base", base, staging / "base", ""), base, s)
            base_record = manifest.read(staging)["sources"].get(f"{key}.base", {}).get(origin(base), {})
            model = staging / "base"
            shutil.rmtree(model / "unet", ignore_errors=True)
            os.replace(found, model / "unet")
        # 4. into place, whole
        if not (model / "model_index.json").is_file():
            raise UserError(f"sources.{key}: the assembled folder has no model_index.json; expected {EXPECTED}")
        if item.dest.exists():
            shutil.rmtree(item.dest)
        item.dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(model, item.dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    files = sorted(p for p in item.dest.rglob("*") if p.is_file())
    unet_from = where(node.part)
    entries = {f.relative_to(item.root).as_posix(): manifest.entry(
        f, unet_from if layout == "pipeline" or f.relative_to(item.dest).parts[0] == "unet" else where(node.base),
        base_record.get("revision")) for f in files}
    old = [n for n in manifest.read(item.root)["files"] if n.startswith(item.dest.name + "/")]
    record = {"layout": "diffusers folder" if layout == "pipeline" else "UNet into the base",
              "fetched_at": manifest.now()}
    manifest.update(item.root, drop=old, files=entries, sources={
        (key, origin(node.part)): {**record, **({"sha256": got["sha256"]} if got.get("sha256") else {})},
        **({(key, origin(node.base)): {"revision": base_record.get("revision"), "fetched_at": manifest.now()}}
           if base_record else {})})
    what = "its diffusers folder" if layout == "pipeline" else f"its UNet into {where(node.base)}"
    return f"{key}: assembled from {where(node.part)} ({what}) -> {item.dest} ({len(files)} files)"

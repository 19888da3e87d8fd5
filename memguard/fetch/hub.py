"""Hugging Face hub sources: ``huggingface_hub.snapshot_download`` (resumable; ``revision`` honoured; the hub
client reads ``HF_ENDPOINT`` and ``HF_TOKEN`` itself)."""

from __future__ import annotations

import os
import shutil
import tempfile
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from memguard.errors import UserError
from memguard.fetch.http import FetchError, reason


def patterns(node: DictConfig) -> list[str] | None:
    if node.get("file"):
        return [str(node.file)]
    allow = OmegaConf.to_container(node.allow_patterns) if node.get("allow_patterns") else None
    variant = node.get("variant")
    if allow and variant:  # weights of a variant: unet/diffusion_pytorch_model.fp16.safetensors
        allow = [p.replace(".safetensors", f".{variant}.safetensors") if p.endswith(".safetensors") else p
                 for p in allow]
    return allow


def _errors(key: str, node: DictConfig, err: Exception) -> Exception:
    from huggingface_hub.errors import (  # start-up: the hub client loads only where the hub is asked
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"https://huggingface.co/{node.repo}"
    cause: BaseException | None = err  # a dry run wraps the hub's answer (DryRunError from RepositoryNotFoundError)
    while cause is not None and not isinstance(cause, (GatedRepoError, RevisionNotFoundError, RepositoryNotFoundError)):
        cause = cause.__cause__ or cause.__context__
    err = cause if isinstance(cause, Exception) else err
    if isinstance(err, GatedRepoError):
        return UserError(f"sources.{key}: {node.repo} is gated: accept its licence on {page}, then "
                         "`huggingface-cli login` (or set HF_TOKEN)")
    if isinstance(err, RevisionNotFoundError):
        return UserError(f"sources.{key}.revision={node.get('revision')!r} is not a revision of {node.repo}")
    if isinstance(err, RepositoryNotFoundError):
        mirrors = [str(m.get("repo")) for m in (node.get("mirrors") or []) if m.get("repo")]
        return FetchError(f"sources.{key}.repo={node.repo!r} was not found on the hub (removed, renamed, or it needs a "
                          "login: `huggingface-cli login` or HF_TOKEN)"
                          + (f"; the source lists the mirror(s) {', '.join(mirrors)}" if mirrors else
                             f"; set sources.{key}.repo to a copy of it"), resumable=False)
    if isinstance(err, LocalEntryNotFoundError) or type(err).__name__ == "DryRunError" \
            or "offline" in str(err).lower() or "connection" in str(err).lower():
        return FetchError(f"{page} could not be reached ({reason(err)})")
    return FetchError(f"{page}: {reason(err)}")


def _snapshot(key: str, node: DictConfig, revision: str | None, local_dir: Path, dry_run: bool) -> Any:
    from huggingface_hub import snapshot_download  # start-up: the hub client loads only where the hub is asked

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UserError("HF_HUB_OFFLINE=1 is set, and memguard fetch needs the hub: run it with HF_HUB_OFFLINE=0")
    from huggingface_hub.utils import disable_progress_bars  # start-up: as above
    from huggingface_hub.utils import logging as hub_logging  # start-up: as above

    disable_progress_bars()  # memguard fetch says per input what it fetched
    hub_logging.set_verbosity_error()  # its retries are its own; what failed is said once, below
    try:
        return snapshot_download(str(node.repo), revision=revision, allow_patterns=patterns(node),
                                 local_dir=str(local_dir), dry_run=dry_run, max_workers=4)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001  (the hub client's errors, each said in one line)
        raise _errors(key, node, err) from err


def plan(key: str, node: DictConfig, dest: Path, revision: str | None) -> list[tuple[str, int | None]]:
    """(file, bytes) of what a fetch would download."""

    local = dest.parent if node.get("file") else dest
    if local.exists():
        infos = _snapshot(key, node, revision, local, dry_run=True)
    else:  # the hub client makes its local folder: in a scratch one, so that planning writes nothing
        with tempfile.TemporaryDirectory(prefix="memguard-fetch-") as scratch:
            infos = _snapshot(key, node, revision, Path(scratch), dry_run=True)
    return [(i.filename, i.file_size) for i in infos if i.will_download]


def fetch(key: str, node: DictConfig, dest: Path, revision: str | None) -> tuple[str, list[Path]]:
    """Download into ``dest`` (a folder; with ``file``: that one file, renamed to ``dest``); the commit and the
    files written."""
    from huggingface_hub import HfApi  # start-up: the hub client loads only where the hub is asked

    if node.get("file"):
        staging = dest.with_name(f".{dest.name}.hub")
        _snapshot(key, node, revision, staging, dry_run=False)
        got = staging / str(node.file)
        if not got.is_file():
            raise FetchError(f"{node.repo} has no {node.file} at revision {revision or 'main'}")
        os.replace(got, dest)
        shutil.rmtree(staging, ignore_errors=True)
        files = [dest]
    else:
        _snapshot(key, node, revision, dest, dry_run=False)
        names = patterns(node) or ["*"]
        files = sorted(p for p in dest.rglob("*") if p.is_file() and ".cache" not in p.relative_to(dest).parts
                       and any(fnmatch(p.relative_to(dest).as_posix(), n) for n in names))
    commit = revision
    if not revision or len(revision) != 40:
        try:
            commit = HfApi().repo_info(str(node.repo), revision=revision or "main").sha
        except Exception as err:  # noqa: BLE001
            raise _errors(key, node, err) from err
    return str(commit), files

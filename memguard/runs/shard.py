"""Sharding a run over processes, and finishing its folder.

A run's images are the (prompt_idx, seed) pairs of its prompts and seeds. A shard makes only the missing
pairs it owns; pair ``(i, s)`` belongs to shard ``(i * 1000003 + s) mod count``. The owner is a function of
the pair alone, so shards never overlap, a resumed shard makes the images it made before, and a folder may be
finished with another shard count than it was started with (each image is its own file, made from its own
seed). Consecutive seeds of a prompt go to consecutive shards, so shards get equal shares up to one image
per prompt.

Where the shard comes from:

- ``shard.index`` / ``shard.count`` (default 0 / 1): one job per shard, e.g. a Hydra sweep
  ``-m shard.index=0,1,2,3 shard.count=4`` through a SLURM launcher.
- ``accelerate launch`` / ``torchrun`` (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` in the environment): each
  process is one shard, on its own device ``cuda:LOCAL_RANK``. Both combine: job ``j`` of ``n``, process ``r`` of
  ``w`` is shard ``j * w + r`` of ``n * w``.

Finishing (tables, figures, ``metrics.json``, the evaluation) is done by whichever process finds the folder with
nothing missing once its own images are written: the last shard to finish, or a later plain ``memguard run``,
which makes nothing and finishes the folder. No process waits for another (no barrier, no process group): under
``accelerate launch -m memguard.cli run -m ...`` a rank moves on to the next sweep point as soon as its share is
written. Two processes that both find the folder complete do not both finish it: finishing holds
``.finish.lock``, and a sharded process skips a folder that another holds or has finished since its last image
was written (``.finished``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from memguard.errors import UserError
from memguard.runs.folder import atomic_write_text, folder_lock, image_name

log = logging.getLogger(__name__)
MIXER = 1_000_003  # a prime: (i * MIXER + s) mod count spreads prompts and seeds evenly over any count
FINISHED = ".finished"


@dataclass(frozen=True)
class Shard:
    """This process's share of a run: the pairs ``(i, s)`` with ``(i * 1000003 + s) mod count == index``."""

    index: int = 0
    count: int = 1
    local_rank: int | None = None  # the process's rank on its node under a launcher that sets LOCAL_RANK

    def owns(self, prompt_idx: int, seed: int) -> bool:
        return (prompt_idx * MIXER + seed) % self.count == self.index

    @property
    def sharded(self) -> bool:
        return self.count > 1

    @property
    def name(self) -> str:
        return f"{self.index}/{self.count}"

    def device(self, device: torch.device) -> torch.device:
        """One GPU per process: ``cuda`` becomes ``cuda:LOCAL_RANK`` under a multi-process launcher."""
        if device.type == "cuda" and device.index is None and self.local_rank is not None:
            if self.local_rank >= torch.cuda.device_count():
                raise UserError(f"LOCAL_RANK={self.local_rank} but torch sees {torch.cuda.device_count()} GPU(s); "
                                "launch at most one process per GPU (accelerate launch --num_processes N)")
            return torch.device("cuda", self.local_rank)
        return device


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def shard_of(cfg: DictConfig) -> Shard:
    """The shard of this process: ``cfg.shard`` combined with a launcher's ``RANK`` / ``WORLD_SIZE``."""
    index, count = cfg.shard.index, cfg.shard.count
    if not isinstance(count, int) or count < 1:
        raise UserError(f"shard.count={count} must be an integer >= 1 (the number of jobs sharing the run)")
    if not isinstance(index, int) or not 0 <= index < count:
        raise UserError(f"shard.index={index} must be an integer in [0, shard.count - 1] = [0, {count - 1}]; "
                        f"give shard.index=0..{count - 1} shard.count={count}")
    world, rank = _env_int("WORLD_SIZE"), _env_int("RANK")
    if world is None or world <= 1:
        return Shard(index, count)
    if rank is None or not 0 <= rank < world:
        raise UserError(f"the launcher set WORLD_SIZE={world} but RANK={os.environ.get('RANK')!r}; "
                        "launch with accelerate launch or torchrun, which set both")
    return Shard(index * world + rank, count * world, _env_int("LOCAL_RANK"))


def write_config(run_dir: Path, cfg: DictConfig) -> None:
    """``config.yaml``: the resolved config without ``shard`` (which differs per process), written atomically
    (every shard writes it when it starts)."""
    config = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "shard"}
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(config))


def record_shard(run_dir: Path, shard: Shard, stats: dict[str, Any]) -> None:
    """Add this shard's generation statistics to ``metrics.json["shards"]["index/count"]``."""
    path = run_dir / "metrics.json"
    with folder_lock(run_dir, "metrics"):
        metrics = json.loads(path.read_text()) if path.exists() else {}
        metrics.setdefault("shards", {})[shard.name] = stats
        atomic_write_text(path, json.dumps(metrics, indent=2) + "\n")


def finished_since_last_image(run_dir: Path, pairs: list[tuple[int, int]]) -> bool:
    """Whether ``.finished`` is newer than every image of ``pairs``: another process finished this folder after
    its last image was written."""
    marker = run_dir / FINISHED
    if not marker.exists():
        return False
    newest = max((run_dir / "images" / image_name(i, s)).stat().st_mtime_ns for i, s in pairs)
    return marker.stat().st_mtime_ns >= newest


@contextmanager
def finishing(run_dir: Path, shard: Shard, pairs: list[tuple[int, int]]) -> Iterator[bool]:
    """Around the tables, figures and evaluation of a complete folder; yields whether this process does them:
    always for an unsharded run (as a single process always did); for a shard, unless another process holds the
    finish lock (it is finishing the same complete folder) or has finished it since its last image was written.
    """
    with folder_lock(run_dir, "finish", blocking=not shard.sharded) as taken:
        done = taken and shard.sharded and finished_since_last_image(run_dir, pairs)
        if not taken or done:
            log.info("shard %s: %s is %s by another process", shard.name, run_dir,
                     "finished" if done else "being finished")
        go = taken and not done
        yield go
        if go:
            atomic_write_text(run_dir / FINISHED, json.dumps({"images": len(pairs), "by": shard.name}) + "\n")


def unfinished_result(run_dir: Path, shard: Shard, made: int, missing: int, total: int) -> dict[str, Any]:
    """What a shard returns when other shards' images are still missing (it does not finish the folder)."""
    log.info("shard %s made %d images; %d of %d are still missing in %s (other shards are making them): the last "
             "shard to finish, or a plain `memguard run` with the same settings, writes the tables",
             shard.name, made, missing, total, run_dir)
    return {"shard": shard.name, "images_made": made, "missing": missing, "n_images": total, "finished": False}


"""Sharding a run: shards make disjoint shares of the pairs into one folder; the last one finishes it."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from memguard.errors import UserError
from memguard.runner import run
from memguard.runs.folder import read_record
from memguard.runs.shard import Shard, shard_of
from tests.numerics import assert_away_from_dtp_ties
from tests.test_run import config


def image_bytes(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "images").glob("*.png"))}


def test_pairs_are_split_by_the_pair_alone() -> None:
    pairs = [(i, s) for i in range(14) for s in range(16)]
    for count in (1, 2, 3, 8):
        owners = [[k for k in range(count) if Shard(k, count).owns(*p)] for p in pairs]
        assert all(len(o) == 1 for o in owners)  # every pair has exactly one shard
        sizes = [sum(o == [k] for o in owners) for k in range(count)]
        assert max(sizes) - min(sizes) <= 14  # equal shares up to one image per prompt
    # a pair's shard does not depend on which other pairs the run has (resume, more seeds)
    assert [Shard(1, 3).owns(5, s) for s in (7, 8, 9)] == [Shard(1, 3).owns(5, s) for s in (7, 8, 9)]


def test_shards_fill_one_folder_and_the_last_finishes(tiny_model_dir: Path, tmp_path: Path) -> None:
    single = tmp_path / "single"
    run(config(tiny_model_dir, single, "mitigation=dtp", "images_per_prompt=3"))
    assert_away_from_dtp_ties([read_record(p).d for p in (single / "images").glob("*.png")])
    sharded = tmp_path / "sharded"
    first = run(config(tiny_model_dir, sharded, "mitigation=dtp", "images_per_prompt=3", "shard.index=1", "shard.count=2"))
    assert first["finished"] is False and first["missing"] == 6 - first["images_made"]
    assert not (sharded / "generations.csv").exists()
    assert len(image_bytes(sharded)) == first["images_made"]
    last = run(config(tiny_model_dir, sharded, "mitigation=dtp", "images_per_prompt=3", "shard.index=0", "shard.count=2"))
    assert last["n_images"] == 6 and last["generation"]["images_made"] == 6 - first["images_made"]
    assert image_bytes(sharded) == image_bytes(single)  # byte-identical PNGs, records included
    for table in ("generations.csv", "trajectories.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(sharded / table), pd.read_csv(single / table))
    metrics = json.loads((sharded / "metrics.json").read_text())
    assert set(metrics["shards"]) == {"0/2", "1/2"}
    assert "shard" not in OmegaConf.load(sharded / "config.yaml")  # per process: recorded in metrics.json

    # a resumed shard finds the folder finished and does nothing; a plain run makes nothing and finishes again
    again = run(config(tiny_model_dir, sharded, "mitigation=dtp", "images_per_prompt=3", "shard.index=1", "shard.count=2"))
    assert again == {"shard": "1/2", "images_made": 0, "n_images": 6, "finished": False}
    plain = run(config(tiny_model_dir, sharded, "mitigation=dtp", "images_per_prompt=3"))
    assert plain["generation"]["images_made"] == 0 and plain["n_images"] == 6


def test_a_new_shard_count_finishes_a_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Shards are by pair: a folder started with 3 shards can be finished with 2, without remaking images."""
    run(config(tiny_model_dir, tmp_path, "images_per_prompt=3", "shard.index=0", "shard.count=3"))
    made = image_bytes(tmp_path)
    run(config(tiny_model_dir, tmp_path, "images_per_prompt=3", "shard.index=1", "shard.count=2"))
    run(config(tiny_model_dir, tmp_path, "images_per_prompt=3", "shard.index=0", "shard.count=2"))
    after = image_bytes(tmp_path)
    assert len(after) == 6 and all(after[name] == data for name, data in made.items())
    assert len(pd.read_csv(tmp_path / "generations.csv")) == 6


@pytest.mark.parametrize(("overrides", "message"), [
    (["shard.index=2", "shard.count=2"], r"shard.index=2 must be an integer in \[0, shard.count - 1\] = \[0, 1\]"),
    (["shard.count=0"], "shard.count=0 must be an integer >= 1"),
])
def test_bad_shards_name_the_key(tiny_model_dir: Path, tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        run(config(tiny_model_dir, tmp_path, *overrides))
    assert not (tmp_path / "config.yaml").exists()


def test_launcher_ranks_become_shards(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert shard_of(config(tiny_model_dir, tmp_path)) == Shard(3, 4, 1)
    assert shard_of(config(tiny_model_dir, tmp_path, "shard.index=1", "shard.count=2")) == Shard(7, 8, 1)

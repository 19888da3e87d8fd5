"""Prompt baselines: deterministic per (prompt, seed), original prompt kept for scoring, composable with schedules."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from memguard.baselines import RandomTokens
from memguard.components import clip_tokenizer
from memguard.runner import run
from tests.test_run import config


@pytest.mark.parametrize("kind", ["word", "number"])
def test_random_tokens_are_inserted_deterministically_per_prompt_and_seed(kind: str) -> None:
    tokenizer, transform = clip_tokenizer(), RandomTokens(kind, count=2)
    prompt = "a red circle on a grey background"
    a, b = transform(prompt, 0, tokenizer), transform(prompt, 0, tokenizer)
    assert a == b and a != prompt and a != transform(prompt, 1, tokenizer)
    words = a.split(" ")
    assert len(words) >= len(prompt.split(" ")) + 2 - (kind == "word")  # a decoded token may be empty or spaced
    remaining = list(words)
    for word in prompt.split(" "):  # the original words are all there, in order
        remaining = remaining[remaining.index(word) + 1 :]
    if kind == "number":
        extra = [w for w in words if w.isdigit()]
        assert len(extra) == 2 and all(0 <= int(w) < 100000 for w in extra)


def test_bad_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="kind='letters' must be word or number"):
        RandomTokens("letters")


def test_rand_numb_run_keeps_the_original_prompt_and_records_the_changed_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    # composed with the DTP schedule: the first steps run at scale 0
    run(config(tiny_model_dir, tmp_path / "run", "mitigation=rand_numb",
               "mitigation.schedule._target_=memguard.guidance.DynamicTransition"))
    gens = pd.read_csv(tmp_path / "run" / "generations.csv")
    assert gens.prompt.tolist() == ["a red circle", "a red circle", "a blue square", "a blue square"]
    assert all(m != p and set(p.split()) <= set(m.split()) for p, m in zip(gens.prompt, gens.model_prompt))
    trajectories = pd.read_csv(tmp_path / "run" / "trajectories.csv")
    assert (trajectories.query("step < 2").scale == 0).all()  # DTP cannot switch before step 2
    run(config(tiny_model_dir, tmp_path / "plain"))
    assert pd.read_csv(tmp_path / "plain" / "generations.csv").model_prompt.isna().all()

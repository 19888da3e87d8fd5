"""NeMo's localization, second part: the statistics name the model they were computed on (a mismatch is refused or
warned in one line naming the fix), and the refinement against a reference written from their code
(ml-research/localizing_memorization_in_diffusion_models, commit f952ede, ``utils/activation_detection.py``
l. 193-258)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch

import memguard.mitigations.nemo_localize as nemo_localize
from memguard.components import random_components
from memguard.errors import UserError
from memguard.families import as_family
from memguard.mitigations.nemo_localize import (
    PROBE,
    NoiseDiffs,
    Settings,
    check_statistics_model,
    compute_statistics,
    localize_prompt,
    max_pairwise,
    ms_ssim,
    save_statistics,
    value_activations,
    value_modules,
)
from tests.test_nemo import DOWN, STATISTICS_PROMPTS

PROMPT = "a red circle"


def _saved(family, path: Path, model: str) -> Path:
    modules = value_modules(family.denoiser)
    save_statistics(path, compute_statistics(family, STATISTICS_PROMPTS, modules), modules, STATISTICS_PROMPTS,
                    model, value_activations(family, [PROBE], modules))
    return path


def test_memguard_statistics_warn_on_another_model_in_one_line(tmp_path: Path, caplog) -> None:
    family = as_family(random_components(seed=0))
    modules = value_modules(family.denoiser)
    path = _saved(family, tmp_path / "stats.pt", "tiny-a")
    with caplog.at_level(logging.WARNING, logger="memguard.mitigations.nemo_localize"):
        check_statistics_model(path, family, modules, "tiny-a")  # its own model: silent
        assert not caplog.records
        other = as_family(random_components(seed=0))
        with torch.no_grad():  # a fine-tune's change of one value layer
            other.denoiser.get_submodule(DOWN).weight.mul_(1.1)
        check_statistics_model(path, other, modules, "tiny-b")
    (record,) = caplog.records
    message = record.getMessage()
    assert "was computed on model 'tiny-a'; model.path='tiny-b' differs" in message and "\n" not in message
    assert "nemo.statistics_prompts=FILE" in message


def test_nemo_statistics_are_sd14s_refused_for_another_text_width_warned_otherwise(tmp_path: Path, caplog,
                                                                                  monkeypatch) -> None:
    family = as_family(random_components(seed=0))  # text width 32: not SD 1.4's 768
    modules = value_modules(family.denoiser)
    theirs = tmp_path / "theirs.pt"
    torch.save(([torch.rand(64), torch.rand(64)], [torch.rand(64) + 0.1, torch.rand(64) + 0.1]), theirs)
    with pytest.raises(UserError) as err:
        check_statistics_model(theirs, family, modules, "sd2")
    assert str(err.value).startswith(f"nemo.statistics='{theirs}' holds NeMo's statistics of SD 1.4 (value layers "
                                     "reading 768-wide text embeddings); model.path='sd2' reads 32-wide ones")
    assert "\n" not in str(err.value) and "nemo.statistics_prompts=FILE" in str(err.value)
    monkeypatch.setattr(nemo_localize, "NEMO_TEXT_WIDTH", 32)  # as if the tiny model were shaped like SD 1.x
    with caplog.at_level(logging.WARNING, logger="memguard.mitigations.nemo_localize"):
        check_statistics_model(theirs, family, modules, "sd14-finetune")
    (record,) = caplog.records
    assert "holds NeMo's statistics of SD 1.4; model.path='sd14-finetune' is used with them" in record.getMessage()


# ---------------------------------------------------------------------------------------------------------------
# The refinement


def _their_refinement(noise_diff, ssim, input_indices: list[list[int]], threshold: float, layers: bool = True,
                      stale: bool = False) -> list[list[int]]:
    """``neuron_refinement`` (``utils/activation_detection.py`` l. 193-258) with ``metric='ssim'`` and no relative
    threshold: ``noise_diff(blocked)`` is their ``compute_noise_diff`` of the looked-at seeds (a list per layer,
    None: nothing blocked), ``ssim`` their per-sample MS-SSIM. ``layers=False`` (no whole-layer pass) and
    ``stale=True`` (each neuron tried against the layer's blocking as the pass began) are the controls."""
    noise_diff_vanilla = noise_diff(None)
    blocking_indices = copy.deepcopy(input_indices)
    for layer_idx, layer_blocked_indices in reversed(list(enumerate(blocking_indices))):
        if len(layer_blocked_indices) == 0 or not layers:
            continue
        curr_indices = copy.deepcopy(blocking_indices)
        curr_indices[layer_idx] = []
        if ssim(noise_diff_vanilla, noise_diff(curr_indices)).max() < threshold:
            blocking_indices[layer_idx] = []
    for layer_idx, blocked_indices in reversed(list(enumerate(blocking_indices))):
        if len(blocked_indices) == 0:
            continue
        blocking_indices_copy = copy.deepcopy(blocking_indices)
        for neuron in blocking_indices_copy[layer_idx]:
            curr_indices = copy.deepcopy(blocking_indices_copy if stale else blocking_indices)
            curr_indices[layer_idx].remove(neuron)
            if ssim(noise_diff_vanilla, noise_diff(curr_indices)).max() < threshold:
                blocking_indices[layer_idx].remove(neuron)
    return blocking_indices


def test_refinement_matches_their_neuron_refinement_and_the_controls_do_not() -> None:
    """A planted neuron (its weights x100) among 51 initially selected (theta 2): their refinement, given memguard's
    initial selection and threshold, keeps what memguard keeps; without the layer pass, or trying neurons against a
    stale blocking, it keeps something else. Their noise differences and MS-SSIM are memguard's (checked in
    tests/test_nemo.py), so this compares the refinement's order and tests alone."""
    base = as_family(random_components(seed=0))
    modules = value_modules(base.denoiser)
    stats = compute_statistics(base, STATISTICS_PROMPTS, modules)
    components = random_components(seed=0)
    with torch.no_grad():
        components.unet.get_submodule(DOWN).weight[5] *= 100
    family = as_family(components)
    settings = Settings(pairwise_threshold=0, initial_threshold=0.999, refinement_threshold=0.9785, theta=2.0,
                        min_theta=0.5, ssim_sigma=0.5, ssim_betas=(0.5, 0.5), samples=4)
    result = localize_prompt(family, PROMPT, stats, modules, settings)
    initial = [list(result.initial.get(name, [])) for name in modules]
    assert sum(map(len, initial)) > 20 and result.refinement_threshold == 0.9785  # a wide initial selection

    diffs = NoiseDiffs(family, PROMPT, settings)
    rows = max_pairwise(diffs(), settings) > settings.pairwise_threshold
    noise_diff = lambda blocked: diffs(None if blocked is None else dict(zip(modules, blocked)), rows)
    ssim = lambda a, b: ms_ssim(a, b, settings)
    refine = lambda **control: _their_refinement(noise_diff, ssim, initial, result.refinement_threshold, **control)
    ours = [sorted(result.neurons.get(name, [])) for name in modules]
    theirs = refine()
    assert [sorted(layer) for layer in theirs] == ours
    assert 5 in ours[0] and 0 < sum(map(len, ours)) < sum(map(len, initial))  # some removed, the planted one kept
    for control in ({"layers": False}, {"stale": True}):
        assert [sorted(layer) for layer in refine(**control)] != ours, control

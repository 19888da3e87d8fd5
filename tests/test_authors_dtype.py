"""Han's and SAIL's optimisations in their authors' dtype (``mitigation.noise.precision=model``, which
``+protocol=authors`` sets): x_T, the candidates and the optimiser state in the model's bfloat16, as their code keeps
them. Compared with the references written from their code (tests/test_han.py, tests/test_sail.py) run on bfloat16
components; the float32 default must differ from those references by far more than the bfloat16 path does, so the
comparison can fail.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from memguard.mitigations.han import HanBatchWise, HanPerSample
from memguard.mitigations.sail import SAIL
from memguard.runner import run
from tests.test_han import _batch, _embeddings, _their_batch_wise, _their_per_sample
from tests.test_run import config
from tests.test_sail import _setup, _their_search


@pytest.fixture(scope="module")
def tiny_bf16(tiny_components):
    return copy.deepcopy(tiny_components).to("cpu", torch.bfloat16)


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """The RMS difference: a few elements whose gradient is near 0 may take an Adam step of the other sign after a
    rounding (its step is ``lr g / (|g| + eps)``), so the maximum says little in bfloat16."""
    return float((a.float() - b.float()).pow(2).mean().sqrt())


def test_han_per_sample_in_bfloat16_is_their_bfloat16_loop(tiny_bf16) -> None:
    family, cond, uncond, latents, start = _batch(tiny_bf16, ["a red circle"], [0])
    assert latents.dtype == torch.bfloat16  # x_T in the model's dtype, as their prepare_latents gives it
    steps = 30
    theirs, _ = _their_per_sample(tiny_bf16.unet, start.scheduler, latents, start.t, _embeddings(cond, uncond),
                                  0.01, steps, None)
    adjust = lambda **kw: HanPerSample(lr=0.01, iterations=steps, target=None, **kw)(
        family, latents, start, cond, uncond, prompts=["a red circle"], seeds=[0])[0]
    ours, default = adjust(precision="model"), adjust()
    moved = _gap(theirs, latents)
    assert moved > 0.05  # the optimisation moved x_T
    assert _gap(ours, theirs) <= 0.05 * moved  # bfloat16 state: their path (reductions may round apart)
    assert _gap(default, theirs) > 5 * _gap(ours, theirs)  # float32 state drifts from it


def test_han_per_sample_weight_decay_is_a_no_op_in_bfloat16_only() -> None:
    """AdamW's decoupled decay ``x (1 - lr 0.01)`` with a zero gradient: bfloat16 rounds it back to x."""
    for dtype, moves in ((torch.bfloat16, False), (torch.float32, True)):
        x = torch.linspace(0.5, 3.0, 64, dtype=dtype).requires_grad_(True)
        start = x.detach().clone()
        optimizer = torch.optim.AdamW([x], lr=0.01)
        x.grad = torch.zeros_like(x)
        for _ in range(5):
            optimizer.step()
        assert bool((x.detach() != start).any()) is moves, dtype
        assert optimizer.state[x]["exp_avg"].dtype == dtype


def test_han_batch_wise_in_bfloat16_is_their_bfloat16_update(tiny_bf16) -> None:
    prompts, seeds = ["a red circle", "a green dot"], [0, 1]
    family, cond, uncond, latents, start = _batch(tiny_bf16, prompts, seeds)
    with torch.no_grad():
        theirs = _their_batch_wise(tiny_bf16.unet, latents, start.t, _embeddings(cond, uncond), 2, 50.0, 0.7)
    adjust = lambda **kw: HanBatchWise(2, 50.0, 0.7, **kw)(family, latents, start, cond, uncond, prompts=prompts,
                                                          seeds=seeds)[0]
    ours, default = adjust(precision="model"), adjust()
    assert ours.dtype == torch.bfloat16 and _gap(ours, theirs) == 0.0  # the same bfloat16 operations
    assert _gap(default, theirs) > 0.01 * _gap(theirs, latents)  # float32 rounds elsewhere


def test_sail_candidates_in_bfloat16_follow_their_bfloat16_search(tiny_bf16) -> None:
    """One Adam step (two loss evaluations, threshold never met: the capped search takes the candidates at its last
    evaluation): bfloat16 candidates land where theirs do; float32 ones move by unrounded steps."""
    family, start, cond, uncond, _ = _setup(tiny_bf16, ["a red circle"], [3])
    settings = dict(threshold=0.0, budget=2, lr=0.05, max_steps=2, max_rounds=1)
    theirs = _their_last_candidates(tiny_bf16, start, cond, uncond, 3, settings)
    gaps = {}
    for precision in ("model", "float32"):
        picks = SAIL(precision=precision, **settings).search(family, start, cond, uncond, 3, 1, (4, 16, 16)).picks
        ours = torch.stack([pick.z for pick in picks[:2]])  # lowest loss first: either order of the two
        assert ours.dtype == (torch.bfloat16 if precision == "model" else torch.float32)
        gaps[precision] = min(_gap(ours, theirs), _gap(ours.flip(0), theirs))
    moved = _gap(theirs, torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(3)))
    assert moved > 0.02  # Adam moved the candidates (~lr per element)
    assert gaps["model"] <= 0.1 * moved and gaps["float32"] > 5 * gaps["model"]


def _their_last_candidates(components, start, cond, uncond, seed: int, settings: dict) -> torch.Tensor:
    """Their round (pipe.py l. 519-566) in bfloat16 with a threshold never met: the candidates at its last loss
    evaluation (what a capped search takes)."""
    unet, budget = components.unet, settings["budget"]
    embeddings = torch.cat([uncond["encoder_hidden_states"]] * budget + [cond["encoder_hidden_states"]] * budget)
    with torch.enable_grad():
        torch.manual_seed(seed)
        lat = torch.randn((budget, 4, 16, 16)).to(unet.dtype).requires_grad_(True)
        doubled = torch.cat([start.scheduler.scale_model_input(lat, start.t)] * 2)
        optimizer = torch.optim.Adam([lat], lr=settings["lr"])
        for _ in range(settings["max_steps"]):
            last = lat.detach().clone()
            eps_u, eps_c = unet(doubled, start.t, encoder_hidden_states=embeddings).sample.chunk(2)
            direction = (eps_c - eps_u) / (eps_c - eps_u).view(budget, -1).norm(dim=1)[:, None, None, None]
            moved = torch.cat([lat + direction] * 2)
            eps_u, eps_c = unet(moved, start.t, encoder_hidden_states=embeddings).sample.chunk(2)
            loss = (eps_c - eps_u).view(budget, -1).norm(dim=1) + 0.05 * lat.view(budget, -1).norm(dim=1)
            loss.sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    return last


@pytest.mark.parametrize("mitigation", ["han", "han_per_sample", "sail"])
def test_protocol_authors_sets_the_model_precision(mitigation: str) -> None:
    from memguard.protocol import apply_protocol
    from tests.test_configs import compose_config

    cfg = compose_config(["+protocol=authors", f"mitigation={mitigation}", "sampler=dpm"])
    assert cfg.mitigation.noise.precision == "float32"
    apply_protocol(cfg, v_prediction=False)
    assert (cfg.sampler.name, cfg.dtype, cfg.mitigation.noise.precision) == ("ddim", "bfloat16", "model")


def test_a_run_under_protocol_authors_records_the_precision(tiny_model_dir: Path, tmp_path: Path) -> None:
    run(config(tiny_model_dir, tmp_path, "+protocol=authors", "mitigation=han_per_sample", "sampler.steps=2",
               "mitigation.noise.iterations=2", "mitigation.noise.target=null"))
    saved = OmegaConf.load(tmp_path / "config.yaml")
    assert (saved.dtype, saved.mitigation.noise.precision) == ("bfloat16", "model")

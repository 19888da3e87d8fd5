"""NeMo (Hintersdorf et al., NeurIPS 2024): the value-neuron masks of ``mitigation=nemo`` against a reference written
from their hook, per image in a batch, restored after; ``memguard nemo-localize`` on tiny components (statistics
computed by memguard from invented prompts, a planted neuron found), its file read by a run, its CLI, its refusals.

The tiny random model memorizes nothing: its noise differences are as dissimilar across seeds as any prompt's
(largest pairwise MS-SSIM about 0.15) and blocking one neuron moves them little (MS-SSIM to the unblocked about
0.97). NeMo's thresholds (0.428: the mean + 1 std of SD 1.4's unmemorized prompts) therefore call every prompt
not memorized; the localization tests set ``pairwise_threshold=0`` (every sample looked at) and 0.99 for the
initial and refinement thresholds, on the tiny model's scale, so the search and the refinement run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from memguard.mitigations import Baselines
from memguard.components import random_components, save_components
from memguard.errors import UserError, instantiate_checked
from memguard.families import as_family
from memguard.guidance import Constant
from memguard.mitigations.nemo import NeMo, value_projections
from memguard.mitigations.nemo_localize import (
    Settings,
    compute_statistics,
    initial_selection,
    load_statistics,
    localize,
    localize_prompt,
    save_statistics,
    value_activations,
    value_modules,
)
from memguard.sampling import generate_images, initial_noise
from tests.test_cli import memguard_here as mg
from tests.test_configs import compose_config

DOWN = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"  # the tiny UNet's two localized layers
MID = "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"
UP = "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v"  # a value projection NeMo does not localize
A, B, C = "a red circle on a white background", "a blue square", "a photo of a cat"
# invented non-memorized prompts for the statistics (NeMo's: 50,000 LAION captions)
STATISTICS_PROMPTS = [f"a {c} {s} on a {b} background" for c in ("red", "green", "blue", "yellow")
                      for s in ("circle", "square", "cross") for b in ("white", "grey")]
TINY = ["nemo.ssim_sigma=0.5", "nemo.ssim_betas=[0.5,0.5]"]  # MS-SSIM on 16x16 latents: two scales, a 5-tap gaussian
SEARCH = ["nemo.pairwise_threshold=0", "nemo.initial_threshold=0.99", "nemo.refinement_threshold=0.99"]


def neuron_file(path: Path, table: dict) -> Path:
    path.write_text(json.dumps({"neurons": table}), encoding="utf-8")
    return path


def no_hooks(module: torch.nn.Module) -> bool:
    return not any(m._forward_hooks for m in module.modules())


# ---------------------------------------------------------------------------------------------------------------
# The masks


class TheirHook:
    """Written from ``hooks/block_activations.py`` l. 15 (commit f952ede): a forward hook that multiplies the
    listed output channels of a linear layer by ``factor`` in place, for every row of the batch."""

    def __init__(self, indices: list[int], factor: float = 0.0) -> None:
        self.indices, self.factor = indices, factor

    def __call__(self, module, inputs, output):
        output[:, :, self.indices] *= self.factor
        return output


def _eps_and_values(family, prompt: str, installed) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One denoiser call on ``[null, condition]`` (their batch order differs, the hook is row-blind) inside
    ``installed``; the masked value activations as the next hook sees them."""
    unet = family.denoiser
    seen: dict[str, torch.Tensor] = {}
    x = initial_noise([3], (4, 16, 16))
    cond, uncond = family.encode([prompt]), family.null(1)
    with torch.no_grad(), installed:
        handles = [unet.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.clone()))
                   for n in (DOWN, MID)]
        try:
            eps = family(torch.cat([x, x]), torch.tensor(901), {"encoder_hidden_states": torch.cat(
                [uncond["encoder_hidden_states"], cond["encoder_hidden_states"]])})
        finally:
            for h in handles:
                h.remove()
    return eps, seen


def test_masks_match_a_reference_written_from_their_hook(tiny_components, tmp_path: Path) -> None:
    """Exact equality: both multiply the same activations by 1.0 (kept) or 0.0 (blocked), which is exact in
    floating point, then run the same network; any tolerance would only hide a difference."""
    from contextlib import ExitStack, contextmanager, nullcontext

    family = as_family(tiny_components)
    unet = family.denoiser
    table = {DOWN: [1, 5, 40], MID: [0, 63]}
    hook = NeMo(str(neuron_file(tmp_path / "n.json", {A: table})))

    @contextmanager
    def theirs():
        with ExitStack() as stack:
            for name, indices in table.items():
                stack.callback(unet.get_submodule(name).register_forward_hook(TheirHook(indices)).remove)
            yield

    plain, plain_values = _eps_and_values(family, A, nullcontext())
    want, want_values = _eps_and_values(family, A, theirs())
    ours, our_values = _eps_and_values(family, A, hook.installed(family, [A], 2))
    assert torch.equal(ours, want)
    for name, blocked in table.items():
        assert torch.equal(our_values[name], want_values[name])
        assert (our_values[name][:, :, blocked] == 0).all()  # both branches' rows
        kept = [c for c in range(64) if c not in blocked]
        assert torch.equal(our_values[name][:, :, kept], plain_values[name][:, :, kept])
    assert (ours - plain).abs().max() > 1e-4  # the masks change the prediction
    assert no_hooks(unet)


def test_each_image_gets_its_own_prompts_neurons_in_a_batch(tiny_components, tmp_path: Path) -> None:
    """A batch of three prompts with different lists (C: localized as not memorized) equals each image alone;
    1e-5: the UNet's batched and single-sample float sums differ by ~1e-7 (as tests/test_extension_points.py)."""
    hook = NeMo(str(neuron_file(tmp_path / "n.json", {A: {DOWN: [5, 7]}, B: {MID: [3], DOWN: [60]}, C: {}})))
    run = lambda prompts, seeds, baselines: generate_images(tiny_components, tiny_components.scheduler, Constant(7.5),
                                                            prompts, seeds, 3, baselines=baselines)[0]
    batch = run([A, B, C], [0, 1, 2], Baselines(attention=hook))
    plain = run([A, B, C], [0, 1, 2], None)
    for i, (prompt, seed) in enumerate([(A, 0), (B, 1), (C, 2)]):
        alone = run([prompt], [seed], Baselines(attention=hook))
        assert torch.allclose(batch[i], alone[0], atol=1e-5), prompt
    assert (batch[0] - plain[0]).abs().max() > 1e-3 and (batch[1] - plain[1]).abs().max() > 1e-3
    assert torch.allclose(batch[2], plain[2], atol=1e-5)  # not memorized: sampled as without the mitigation
    assert no_hooks(tiny_components.unet)


def test_hooks_are_removed_after_an_error(tiny_components, tmp_path: Path) -> None:
    family = as_family(tiny_components)
    hook = NeMo(str(neuron_file(tmp_path / "n.json", {A: {DOWN: [5]}})))
    with pytest.raises(RuntimeError, match="boom"), hook.installed(family, [A], 2):
        assert not no_hooks(family.denoiser)
        raise RuntimeError("boom")
    assert no_hooks(family.denoiser)
    # a batch of another size than the masks: refused, then removed
    with pytest.raises(RuntimeError, match="rows"), hook.installed(family, [A], 3):
        family(torch.zeros(2, 4, 16, 16), torch.tensor(1), family.null(2))
    assert no_hooks(family.denoiser)


def test_sdxl_value_projections_are_masked_the_same_way(tmp_path: Path) -> None:
    from memguard.families.sdxl import SDXL

    family = SDXL.random(0)
    modules = value_modules(family.denoiser)
    assert modules and all(m.endswith("transformer_blocks.0.attn2.to_v") for m in modules)
    hook = NeMo(str(neuron_file(tmp_path / "n.json", {A: {modules[0]: [0, 3]}})))
    run = lambda baselines: generate_images(family, family.scheduler, Constant(5.0), [A], [0], 2, baselines=baselines)[0]
    assert (run(Baselines(attention=hook)) - run(None)).abs().max() > 1e-4
    assert no_hooks(family.denoiser)


# ---------------------------------------------------------------------------------------------------------------
# Localization


def test_the_localized_layers_are_their_seven_on_an_sd1_shaped_unet() -> None:
    """SD 1.x's block layout (three cross-attention down blocks of two attentions, a mid block) at tiny widths."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, attention_head_dim=8,
                                norm_num_groups=32, sample_size=8)
    want = [f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2.to_v" for b in range(3) for a in range(2)]
    assert value_modules(unet) == [*want, MID]
    assert len(value_projections(unet)) == 7 + 9  # the up blocks' nine are not localized


def test_initial_selection_is_z_scores_beyond_theta_then_the_top_k() -> None:
    from memguard.mitigations.nemo_localize import Statistics

    stats = Statistics([torch.zeros(6), torch.ones(4)], [torch.ones(6), torch.full((4,), 0.5)])
    acts = [torch.tensor([0.5, 6.0, 0.1, 5.5, 0.2, 3.0]), torch.tensor([1.0, 1.4, 4.0, 1.1])]  # b: z 0, 0.8, 6, 0.2
    assert initial_selection(acts, stats, ["a", "b"], 5.0, 0) == {"a": [1, 3], "b": [2]}  # |a - mu| / sigma > 5
    assert initial_selection(acts, stats, ["a", "b"], 5.0, 2) == {"a": [1, 3], "b": [2, 1]}  # each channel once
    assert initial_selection(acts, stats, ["a", "b"], 1.0, 0) == {"a": [1, 3, 5], "b": [2]}  # (1.4 - 1) / 0.5 <= 1


def test_value_activations_are_the_token_mean_of_the_absolute_value_projection(tiny_components) -> None:
    family = as_family(tiny_components)
    (down, mid) = value_activations(family, [A, B], [DOWN, MID])
    embedding = family.encode([B])["encoder_hidden_states"][0]
    with torch.no_grad():
        want = tiny_components.unet.get_submodule(MID)(embedding).abs().mean(dim=0)
    assert down.shape == (2, 64) and torch.allclose(mid[1], want, atol=1e-6)


def test_noise_differences_are_the_scaled_second_step_prediction_minus_the_noise(tiny_components) -> None:
    """``D = eps(x, t_1) - x`` min-max scaled per sample and channel (detection l. 181-184), ``x``: one
    ``torch.randn`` of all samples from the seed (l. 12, 23), ``t_1``: the second timestep of 50 DDIM steps;
    guidance 0: the conditional prediction, else ``eps_u + g (eps_c - eps_u)`` (twice the evaluations)."""
    from memguard.mitigations.nemo_localize import NoiseDiffs

    family = as_family(tiny_components)
    x = torch.randn((10, 4, 16, 16), generator=torch.Generator().manual_seed(1))
    t = torch.tensor(961)  # SD's scheduler config (steps_offset 1): 981, 961, ...
    with torch.no_grad():
        eps_c = family(x, t, {k: v.expand(10, -1, -1) for k, v in family.encode([A]).items()})
        eps_u = family(x, t, family.null(10))

    def scaled(eps: torch.Tensor) -> torch.Tensor:
        d = eps - x
        low, high = d.amin(dim=(2, 3), keepdim=True), d.amax(dim=(2, 3), keepdim=True)
        return (d - low) / (high - low)

    for guidance, eps in ((0.0, eps_c), (7.0, eps_u + 7.0 * (eps_c - eps_u))):
        diffs = NoiseDiffs(family, A, Settings(guidance=guidance))
        assert diffs.t == t
        assert torch.allclose(diffs(), scaled(eps), atol=1e-5)  # 1e-5: guided, both branches are one batch of 20
        assert diffs.evaluations == (20 if guidance else 10)


def _planted(tmp_path: Path, channel: int = 5, scale: float = 100.0) -> Path:
    """The tiny model with one value neuron of the down block's layer planted to be extreme: its weights times 100."""
    components = random_components(seed=0)
    with torch.no_grad():
        components.unet.get_submodule(DOWN).weight[channel] *= scale
    return save_components(components, tmp_path / "planted")


def _statistics(tiny_components, path: Path) -> Path:
    family = as_family(tiny_components)
    modules = value_modules(family.denoiser)
    save_statistics(path, compute_statistics(family, STATISTICS_PROMPTS, modules), modules, STATISTICS_PROMPTS)
    return path


def _localize_cfg(model: Path, tmp_path: Path, *extra: str):
    return compose_config(["scenario=custom", f"model.path={model}", f"prompts=[{A},{C}]",
                           f"paths.output_dir={tmp_path / 'out'}", "progress=false", "device=cpu", *TINY, *extra])


def test_localize_finds_a_planted_neuron_and_the_run_reads_the_file(tiny_components, tiny_model_dir: Path,
                                                                     tmp_path: Path) -> None:
    from memguard.runner import run
    from tests.test_run import config

    stats = _statistics(tiny_components, tmp_path / "stats.pt")  # the model before the neuron was planted
    planted = _planted(tmp_path)
    summary = localize(_localize_cfg(planted, tmp_path, f"nemo.statistics={stats}", *SEARCH))
    output = tmp_path / "out" / "nemo" / "custom" / "neurons.json"
    data = json.loads(output.read_text())
    for prompt in (A, C):  # the planted neuron is found (z ~ 1e3) and survives the refinement; chance ones do not
        assert data["neurons"][prompt] == {DOWN: [5]}
        assert 5 in data["prompts"][prompt]["initial"][DOWN] and data["prompts"][prompt]["memorized"]
    # cost: 10 unblocked + 10 per MS-SSIM test: A's z-scores beyond 5 are the planted one's alone, so one initial
    # round, one layer, one neuron, and the refined selection's
    record = data["prompts"][A]
    assert record["initial"] == {DOWN: [5]} and record["unet_evals"] == 10 + 10 * 4 and summary["n_prompts"] == 2

    # the same settings again: nothing redone; other settings: refused
    again = localize(_localize_cfg(planted, tmp_path, f"nemo.statistics={stats}", *SEARCH))
    assert again["localized_now"] == 0
    with pytest.raises(UserError, match=r"other settings \(samples: 10 -> 4"):
        localize(_localize_cfg(planted, tmp_path, f"nemo.statistics={stats}", *SEARCH, "nemo.samples=4"))

    # the run reads the file: mitigation=nemo changes the images of the planted model, the prompts' own neurons
    metrics = run(config(planted, tmp_path / "nemo", "mitigation=nemo", f"mitigation.attention.neurons={output}",
                         f"prompts=[{A},{C}]"))
    run(config(planted, tmp_path / "none", "mitigation=none", f"prompts=[{A},{C}]"))
    assert metrics["mitigation"] == "nemo" and metrics["unet_evals_per_image"] == 2 * 6
    import numpy as np
    from PIL import Image

    image = lambda folder: np.asarray(Image.open(folder / "images" / "00000_0.png"), dtype=float)
    assert np.abs(image(tmp_path / "nemo") - image(tmp_path / "none")).max() > 2


def test_the_initial_selection_widens_until_max_k_or_min_theta(tiny_components) -> None:
    """An SSIM that never falls to the initial threshold (-1): each round theta -= theta_step and k += 1; at
    k >= max_k, or theta at min_theta, the search stops and its last similarity becomes the refinement threshold
    (3_detect l. 82-97)."""
    family = as_family(tiny_components)
    modules = value_modules(family.denoiser)
    stats = compute_statistics(family, STATISTICS_PROMPTS, modules)
    base = {"ssim_sigma": 0.5, "ssim_betas": (0.5, 0.5), "pairwise_threshold": 0.0, "initial_threshold": -1.0,
            "samples": 4}
    result = localize_prompt(family, C, stats, modules, Settings(**base, max_k=3))
    assert (result.theta, result.k) == (4.25, 3) and result.refinement_threshold == result.initial_ssim
    acts = value_activations(family, [C], modules)
    for name, a in zip(modules, acts):  # the last round's selection: z > 4.5 and the 2 most active per layer
        assert set(a[0].topk(2).indices.tolist()) <= set(result.initial[name])
    layers, neurons = len(result.initial), sum(map(len, result.initial.values()))  # step 2 tests the kept layers'
    assert 4 + 4 * (3 + layers + 1) <= result.unet_evals <= 4 + 4 * (3 + layers + neurons + 1)
    result = localize_prompt(family, C, stats, modules, Settings(**base, theta_step=2.0))
    assert (result.theta, result.k) == (1.0, 2)


def test_with_their_thresholds_the_tiny_model_memorizes_nothing(tiny_components, tmp_path: Path) -> None:
    """As their detection writes a prompt below the pairwise threshold: no neurons (3_detect l. 57-68), at the
    cost of the unblocked noise differences alone."""
    family = as_family(tiny_components)
    modules = value_modules(family.denoiser)
    stats = compute_statistics(family, STATISTICS_PROMPTS, modules)
    result = localize_prompt(family, C, stats, modules, Settings(ssim_sigma=0.5, ssim_betas=(0.5, 0.5)))
    assert not result.memorized and result.neurons == {} and result.unet_evals == 10
    assert max(result.max_pairwise_ssim) < 0.428


def test_statistics_are_computed_from_a_prompt_file_and_mismatched_ones_refused(tiny_model_dir: Path,
                                                                                  tmp_path: Path) -> None:
    prompts = tmp_path / "unmemorized.txt"
    prompts.write_text("\n".join(STATISTICS_PROMPTS) + "\n")
    stats = tmp_path / "stats.pt"
    localize(_localize_cfg(tiny_model_dir, tmp_path, f"nemo.statistics={stats}", f"nemo.statistics_prompts={prompts}",
                           "nemo.samples=3"))
    saved = torch.load(stats, weights_only=True)
    assert saved["modules"] == [DOWN, MID] and saved["n_prompts"] == len(STATISTICS_PROMPTS)
    made = stats.stat().st_mtime_ns  # the same prompts and model again: kept, not recomputed
    localize(_localize_cfg(tiny_model_dir, tmp_path, f"nemo.statistics={stats}", f"nemo.statistics_prompts={prompts}",
                           "nemo.samples=3"))
    assert stats.stat().st_mtime_ns == made
    family = as_family(random_components(seed=0))
    acts = value_activations(family, STATISTICS_PROMPTS, [DOWN, MID])
    assert torch.allclose(saved["std"][1], acts[1].std(dim=0), atol=1e-6)  # Bessel-corrected, over prompts

    # a file shaped like NeMo's (a tuple of 7 means and 7 stds, SD 1.x's widths; invented values): SD 1.x only
    theirs = tmp_path / "theirs.pt"
    widths = [320, 320, 640, 640, 1280, 1280, 1280]
    torch.save(([torch.rand(w) for w in widths], [torch.rand(w) + 0.1 for w in widths]), theirs)
    assert len(load_statistics(theirs, {f"layer{i}": w for i, w in enumerate(widths)}).mean) == 7
    with pytest.raises(UserError) as err:
        localize(_localize_cfg(tiny_model_dir, tmp_path, f"nemo.statistics={theirs}", "nemo.output=other.json"))
    assert str(err.value).startswith(f"nemo.statistics='{theirs}' holds statistics of 7 value layers of widths 320, "
                                     "320, 640, 640, 1280, 1280, 1280, this model's 2 localized layers have 64, 64")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"theirs.pt' exists and was not computed by memguard"):  # never overwritten
        localize(_localize_cfg(tiny_model_dir, tmp_path, f"nemo.statistics={theirs}",
                               f"nemo.statistics_prompts={prompts}"))


def test_bad_input_is_one_line_naming_the_key(tiny_components, tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    family = as_family(tiny_components)
    node = lambda **kw: OmegaConf.create({"_target_": "memguard.mitigations.nemo.NeMo", **kw})
    cases = [
        (node(neurons=None), r"^mitigation.attention.neurons is not set; give mitigation.attention.neurons=FILE"),
        (node(neurons=str(tmp_path / "none.json")),
         r"^mitigation.attention.neurons='.*none.json' is not a file; make it with `memguard nemo-localize`"),
        (node(neurons=str(neuron_file(tmp_path / "x.json", []))), r"has no \"neurons\" object"),
        (node(neurons=str(neuron_file(tmp_path / "y.json", {A: {DOWN: ["5"]}}))),
         r"not a mapping of module names to lists of channel indices"),
        (node(neurons=str(neuron_file(tmp_path / "z.json", {})), unlisted="skip"),
         r"^mitigation.attention.unlisted='skip' must be refuse or unmasked"),
    ]
    for cfg, message in cases:
        with pytest.raises(UserError, match=message) as err:
            instantiate_checked(cfg, "mitigation.attention")
        assert "\n" not in str(err.value)
    for table, message in [({A: {"conv_in": [0]}}, r"names module 'conv_in', which is not a cross-attention value"),
                           ({A: {UP.replace("up_blocks.0", "up_blocks.7"): [0]}}, r"names module 'up_blocks.7"),
                           ({A: {DOWN: [64]}}, rf"{DOWN} channel 64 is out of range \[0, 64\)"),
                           ({B: {DOWN: [1]}}, r"has no entry for the prompt 'a red circle on a white background'")]:
        hook = NeMo(str(neuron_file(tmp_path / "t.json", table)))
        with pytest.raises(UserError, match=message) as err:
            hook.installed(family, [A], 2)
        assert str(err.value).startswith("mitigation.attention.neurons=") and "\n" not in str(err.value)
    unmasked = NeMo(str(neuron_file(tmp_path / "u.json", {B: {UP: [1]}})), unlisted="unmasked")
    assert unmasked.scales(family.denoiser, [A]) == {}  # an unlisted prompt, sampled without masks
    assert unmasked.scales(family.denoiser, [A, B])[UP][:, 1].tolist() == [1.0, 0.0]  # any attn2.to_v may be named
    with pytest.raises(UserError, match="nemo.ssim_sigma=1.5, nemo.ssim_betas=\\[0.33, 0.33, 0.33\\]: MS-SSIM cannot be "
                                        "computed on 16x16 latents"):
        localize(_localize_cfg(_saved(tiny_components, tmp_path), tmp_path, "nemo.ssim_sigma=1.5",
                               "nemo.ssim_betas=[0.33,0.33,0.33]", "nemo.statistics=s.pt"))
    with pytest.raises(UserError, match=r"^nemo.samples=1 must be an integer >= 2$"):
        Settings.from_config({"samples": 1})


def _saved(components, tmp_path: Path) -> Path:
    folder = tmp_path / "tiny"
    return folder if folder.is_dir() else save_components(components, folder)


def test_other_families_are_refused_in_one_line() -> None:
    from memguard.families.dit import DiT
    from memguard.families.sd3 import SD3

    hook = NeMo.__new__(NeMo)  # the class's families, without a file
    for family in (DiT, SD3):
        with pytest.raises(UserError) as err:
            family.check_baselines(Baselines(attention=hook), "nemo")
        assert "\n" not in str(err.value) and "sd and sdxl" in str(err.value)


def test_the_statistics_source_is_fetched_into_nemo_statistics(tmp_path: Path) -> None:
    """memguard fetch brings NeMo's file where nemo.statistics names a path (scenario=nemo500 names one); served
    here from 127.0.0.1 with an invented file of the same shape."""
    from memguard.fetch.command import fetch, plan
    from tests.fetch_servers import serve, static

    cfg = compose_config(["scenario=nemo500", f"paths.data_dir={tmp_path / 'data'}"])
    node = cfg.sources.nemo_statistics
    assert "/f952eded64fca0bcf42e0bb3be9a01d64653cfdb/statistics/statistics_additional_laion_prompts_v1_4.pt" in node.url
    assert len(node.sha256) == 64
    assert cfg.nemo.statistics == str(tmp_path / "data" / "nemo500" / "statistics_additional_laion_prompts_v1_4.pt")
    assert [i.key for i in plan(compose_config(["scenario=custom"]))[0]] == []  # null nemo.statistics: not fetched
    invented = tmp_path / "invented.pt"
    torch.save(([torch.ones(64), torch.ones(64)], [torch.ones(64), torch.ones(64)]), invented)
    data = invented.read_bytes()
    with serve([("/stats.pt", static(data))]) as server:
        lines = fetch(compose_config(["scenario=nemo500", f"paths.data_dir={tmp_path / 'data'}",
                                      "fetch.only=[nemo_statistics]", f"sources.nemo_statistics.url={server.url}/stats.pt",
                                      f"sources.nemo_statistics.sha256={hashlib.sha256(data).hexdigest()}"]))
    dest = Path(cfg.nemo.statistics)
    assert dest.read_bytes() == data and any("nemo_statistics" in line for line in lines)
    assert load_statistics(dest, {DOWN: 64, MID: 64}).std[0].sum() == 64


def test_defaults_are_their_codes() -> None:
    """conf's nemo node and mitigation=nemo hold the defaults of 3_detect_memorized_neurons.py l. 124-138, 95 and
    4_generate_images.py l. 297 (commit f952ede); +protocol=authors runs nemo as their generation does."""
    cfg = compose_config(["scenario=nemo500", "mitigation=nemo", "+protocol=authors"])  # tiny sets its own MS-SSIM scales
    settings = Settings.from_config(cfg.nemo)
    assert settings == Settings(seed=1, samples=10, steps=50, noise_step=1, guidance=0.0, pairwise_threshold=0.428,
                                initial_threshold=0.428, refinement_threshold=0.428, theta=5.0, theta_step=0.25,
                                min_theta=1.0, k=0, max_k=1280, factor=0.0, ssim_sigma=1.5, ssim_betas=(0.33,) * 3)
    assert cfg.mitigation.attention.factor == 0.0 and cfg.mitigation.attention.neurons == cfg.nemo.output
    assert (cfg.protocol.mitigations.nemo.sampler, cfg.protocol.mitigations.nemo.dtype) == ("ddim", "float16")


# ---------------------------------------------------------------------------------------------------------------
# The command


@pytest.mark.slow
def test_cli_help_and_a_small_localization(tiny_model_dir: Path, tmp_path: Path) -> None:
    help_ = mg("nemo-localize", "--help", cwd=tmp_path)  # the command, in this process
    assert help_.returncode == 0, help_.stderr
    assert help_.stdout.startswith("usage: memguard nemo-localize [key=value ...]")
    assert "  nemo.pairwise_threshold  0.428" in help_.stdout and "memguard nemo-localize scenario=nemo500" in help_.stdout
    prompts = tmp_path / "unmemorized.txt"
    prompts.write_text("\n".join(STATISTICS_PROMPTS) + "\n")
    result = mg("nemo-localize", "scenario=custom", f"model.path={tiny_model_dir}", f"prompts=[{C}]", *TINY,
                f"nemo.statistics_prompts={prompts}", f"nemo.statistics={tmp_path / 'stats.pt'}", "nemo.samples=3",
                "device=cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    output = tmp_path / "outputs" / "nemo" / "custom" / "neurons.json"
    assert "0 of 1 prompts memorized" in result.stdout and "written to outputs/nemo/custom/neurons.json" in result.stdout
    assert json.loads(output.read_text())["neurons"] == {C: {}}
    bad = mg("nemo-localize", "scenario=custom", f"model.path={tiny_model_dir}", f"prompts=[{C}]", *TINY, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "memguard: error: nemo.statistics is not set")

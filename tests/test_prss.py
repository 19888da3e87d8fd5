"""PRSS (memguard.mitigations.prss): prompt re-anchoring against a reference written from the authors' denoising
loop (chenchen-usyd/BE-PRSS ``local_sd_pipeline.py`` l. 186-225, commit fb2e942), semantic search against one
written from their ``aug_prompt_ss`` (l. 886-949), per-sample results, the run path, and bad input in one line.

The reference comparisons run in float64, so they hold to ~1e-10 on any CPU; the batch-independence checks run
in float32, where one UNet call on a batch of 3 and one on 6 round differently (~1e-6).
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import Tensor

from memguard.mitigations import Baselines
from memguard.errors import UserError
from memguard.families import as_family
from memguard.guidance import Constant
from memguard.mitigations.prss import PromptReanchoring, SemanticSearch, read_paraphrases
from memguard.runner import run
from memguard.sampling import generate_images, initial_noise, sample
from tests.test_run import config

FIXTURE = Path(__file__).parent / "fixtures" / "prompts" / "prss_paraphrases.jsonl"
ORIGINAL, MODIFIED, G, STEPS = "a red circle", "a blue square on a white background", 7.5, 4


@pytest.fixture(scope="module")
def tiny64(tiny_components):
    return as_family(copy.deepcopy(tiny_components).to("cpu", torch.float64))


class Recording(PromptReanchoring):
    """PR that keeps each step's combined prediction."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list[Tensor] = []

    def combine(self, *args) -> Tensor:
        self.seen.append(super().combine(*args).clone())
        return self.seen[-1]


def _their_step(family, latents: Tensor, t: Tensor, modified: Tensor, original: Tensor, null: Tensor,
                target: float, threshold: float) -> tuple[Tensor, float | None]:
    """The prediction of one step as their loop makes it with ``m_trigger`` true: a UNet call on ``[x, x]`` with
    ``[null, modified]``, a second with ``[null, original]``, the gate on the norm of the whole batch tensor, the
    scalar ``s_pr``. Returns the prediction and ``s_pr`` (None: plain CFG)."""
    unet, n = family.denoiser, len(latents)
    x = family.scheduler.scale_model_input(torch.cat([latents] * 2), t)
    first = unet(x, t, encoder_hidden_states=torch.cat([null.expand(n, -1, -1), modified.expand(n, -1, -1)])).sample
    second = unet(x, t, encoder_hidden_states=torch.cat([null.expand(n, -1, -1), original.expand(n, -1, -1)])).sample
    uncond, text_modified = first.chunk(2)
    text_original = second.chunk(2)[1]
    magnitude = (text_modified - uncond).norm(p=2).item()
    if magnitude <= target:
        return uncond + G * (text_modified - uncond), None
    scaler = (G * target - threshold) / (G - 1)
    s = min((magnitude - scaler) / (threshold - scaler) * G, G)
    return text_original + s * (text_modified - text_original) + (G - s) * (text_modified - uncond), s


def _compare_with_their_loop(family, seeds: list[int], target: float, threshold: float, gate: str) -> list:
    """Sample with PR, then recompute every step's prediction from the step's latents with ``_their_step``;
    returns the reference's ``s_pr`` per step."""
    cond = family.encode([MODIFIED] * len(seeds))
    noise = initial_noise(seeds, (4, 16, 16), dtype=torch.float64)
    pr, latents = Recording(target=target, threshold=threshold, gate=gate), []
    extra = pr.conditions(family, [ORIGINAL] * len(seeds), None)
    sample(family, family.scheduler, cond, family.null(len(seeds)), noise, Constant(G), STEPS,
           lambda step: latents.append((step["x"].clone(), family.scheduler.timesteps[step["step"]])),
           branches=pr, extra=extra)
    with torch.no_grad():
        embed = lambda p: family.encode([p])["encoder_hidden_states"]
        reference = [_their_step(family, x, t, embed(MODIFIED), embed(ORIGINAL), embed(""), target, threshold)
                     for x, t in latents]
    for k, ((want, _), got) in enumerate(zip(reference, pr.seen)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=f"step {k}")
    assert pr.info()["prss_steps_reanchored"].tolist() == [sum(s is not None for _, s in reference)] * len(seeds)
    return [s for _, s in reference]


@pytest.mark.parametrize("scale", [(0.5, 1.5), (0.3, 0.6)])  # target, threshold as fractions of r at step 0
def test_reanchoring_matches_their_loop_for_one_image(tiny64, scale: tuple[float, float]) -> None:
    noise = initial_noise([1], (4, 16, 16), dtype=torch.float64)
    probe = []  # ||eps_c - eps_u|| at step 0, where the two runs still agree
    sample(tiny64, tiny64.scheduler, tiny64.encode([MODIFIED]), tiny64.null(1), noise, Constant(G), 1,
           lambda step: probe.append(float(step["d"][0]) ** 0.5))
    s_pr = _compare_with_their_loop(tiny64, [1], probe[0] * scale[0], probe[0] * scale[1], "sample")
    assert s_pr[-1] is None and s_pr[0] is not None  # the gate fires at the first step, not at the last
    assert (1 < s_pr[0] < G) if scale[1] > 1 else s_pr[0] == G  # interpolated, or capped at g


def test_batch_gate_matches_their_batch_formula(tiny64) -> None:
    """Two images of one prompt (their ``num_images_per_prompt=2``): one gate and one ``s_pr`` for both."""
    s_pr = _compare_with_their_loop(tiny64, [0, 1], 0.6, 2.5, "batch")
    assert s_pr[0] is not None and s_pr[-1] is None


def _pr_images(components, seeds: list[int], modified: list[str], original: list[str], **settings):
    pr = PromptReanchoring(target=0.05, threshold=2.0, **settings)  # the gate: per sample unless told
    return generate_images(components, components.scheduler, Constant(G), modified, seeds, STEPS,
                           baselines=Baselines(branches=pr), original=original)


def test_per_sample_gate_gives_an_image_the_same_result_alone_and_in_a_batch(tiny_components) -> None:
    both, traj = _pr_images(tiny_components, [0, 1], [MODIFIED, "a green cross"], [ORIGINAL, "a grey triangle"])
    alone, one = _pr_images(tiny_components, [1], ["a green cross"], ["a grey triangle"])
    torch.testing.assert_close(alone[0], both[1], rtol=0, atol=1e-5)
    assert traj.unet_evals == 3 * STEPS
    assert int(traj.info["prss_steps_reanchored"][1]) == int(one.info["prss_steps_reanchored"][0]) > 0
    plain, _ = generate_images(tiny_components, tiny_components.scheduler, Constant(G), [MODIFIED, "a green cross"],
                               [0, 1], STEPS)
    assert (plain - both).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # it re-anchored both
    # the batch gate (their norm over the batch) makes the same image depend on its batch
    batch, _ = _pr_images(tiny_components, [0, 1], [MODIFIED, "a green cross"], [ORIGINAL, "a grey triangle"],
                          gate="batch")
    alone, _ = _pr_images(tiny_components, [1], ["a green cross"], ["a grey triangle"], gate="batch")
    assert (alone[0] - batch[1]).abs().max() > 1e-3


def test_an_image_below_the_trigger_is_sampled_with_plain_cfg(tiny_components) -> None:
    prompts = [MODIFIED, "a green cross"]
    plain, traj = generate_images(tiny_components, tiny_components.scheduler, Constant(G), prompts, [0, 1], STEPS)
    step0 = traj.d[:, 0].sqrt().tolist()  # the original prompts' first-step norms (here original = modified)
    images, traj = _pr_images(tiny_components, [0, 1], prompts, prompts, trigger=sum(step0) / 2)
    triggered = [int(v > sum(step0) / 2) for v in step0]
    assert sorted(triggered) == [0, 1] and traj.info["prss_triggered"].tolist() == triggered
    low, high = triggered.index(0), triggered.index(1)
    torch.testing.assert_close(images[low], plain[low], rtol=0, atol=1e-5)
    assert (images[high] - plain[high]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Semantic search


def _magnitude(family, x: Tensor, t: Tensor, text: str) -> float:
    """``||eps_c - eps_u||_2`` of ``text`` at ``x``, from one UNet call on ``[null, text]`` (as their search)."""
    embeddings = torch.cat([family.encode([p])["encoder_hidden_states"] for p in ("", text)])
    uncond, cond = family.denoiser(torch.cat([x, x]), t, encoder_hidden_states=embeddings).sample.chunk(2)
    return (cond - uncond).norm(p=2).item()


def _their_search(family, x: Tensor, t: Tensor, texts: list[str], target: float) -> int:
    """Their ``aug_prompt_ss`` for one image: candidates in order (the original first), each with its own
    ``[null, candidate]`` UNet call; the first at or below ``target``, else the argmin of all."""
    magnitudes = []
    for text in texts:
        magnitudes.append(_magnitude(family, x, t, text))
        if magnitudes[-1] <= target:
            return len(magnitudes) - 1
    return int(np.argmin(magnitudes))


# candidates whose first-step magnitudes on the tiny model (seeds 0, 1) cover every regime of the search: the
# original below the target; a paraphrase below it that is not the smallest (the first wins); none below (argmin)
SEARCH = {"a red circle on a grey background": ["a grey background with a red circle drawn on it",
                                                "a circle drawn in red", "red circle"],
          "a blue square": ["a square in blue on a white background, centred", "blue square", "one blue box"]}


def test_semantic_search_matches_their_search(tiny64, tmp_path: Path) -> None:
    (path := tmp_path / "search.json").write_text(json.dumps(SEARCH))
    prompts, seeds, t = list(SEARCH), [0, 1], torch.tensor(999)  # DDIM: the first model input is x_T itself
    x = initial_noise(seeds, (4, 16, 16), dtype=torch.float64)
    with torch.no_grad():
        everything = [[_magnitude(tiny64, x[i : i + 1], t, text) for text in [p, *SEARCH[p]]]
                      for i, p in enumerate(prompts)]
    values = sorted(v for row in everything for v in row)
    targets = [values[0] / 2, *[(a + b) / 2 for a, b in itertools.pairwise(values)], values[-1] * 2]  # away from ties
    seen = set()
    for target in targets:
        cond, info = SemanticSearch(str(path), l_target=target)(tiny64, x, t, tiny64.encode(prompts), tiny64.null(2),
                                                                prompts=prompts)
        for i, prompt in enumerate(prompts):
            with torch.no_grad():
                want = _their_search(tiny64, x[i : i + 1], t, [prompt, *SEARCH[prompt]], target)
            assert info["ss_choice"][i] == want, (target, i)
            text = [prompt, *SEARCH[prompt]][want]
            want_embedding = tiny64.encode([text])["encoder_hidden_states"][0]
            torch.testing.assert_close(cond["encoder_hidden_states"][i], want_embedding)
            below = everything[i][want] <= target
            assert info["unet_evals_before"][i] == 2 + (want if below else len(SEARCH[prompt]))
            assert bool(info["ss_reached_target"][i]) == below
            seen.add("original" if want == 0 and below else "argmin" if not below and want > 0 else
                     "first, not smallest" if below and everything[i][want] > min(everything[i]) else "other")
    assert {"original", "first, not smallest", "argmin"} <= seen  # every regime ran


@pytest.mark.parametrize("kind", ["json", "csv"])
def test_paraphrases_read_from_a_json_or_csv_mapping(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"p.{kind}"
    if kind == "json":
        path.write_text(json.dumps({"a red circle": ["one", "two"], "a blue square": "three", "a cross": []}))
    else:
        path.write_text("prompt,paraphrase\na red circle,one\na blue square,three\na red circle,two\na cross,\n")
    assert read_paraphrases(str(path)) == {"a red circle": ["one", "two"], "a blue square": ["three"], "a cross": []}
    assert read_paraphrases(str(FIXTURE))["a red circle"] == ["A circle painted in red.", "One round red shape.",
                                                              "Have you seen the red disc?"]


# ---------------------------------------------------------------------------------------------------------------
# Runs


def _png_diff(a: Path, b: Path, files) -> float:
    return max(np.abs(np.asarray(Image.open(a / f), dtype=float) - np.asarray(Image.open(b / f), dtype=float)).max()
               for f in files)


def test_prss_run_counts_three_evaluations_per_step_and_its_optimisation(tiny_model_dir: Path,
                                                                           tmp_path: Path) -> None:
    metrics = run(config(tiny_model_dir, tmp_path / "pe", "mitigation=prss", "mitigation.embedding.l_target=1e-6",
                         "mitigation.embedding.max_iters=2", "mitigation.branches.target=0.1",
                         "mitigation.branches.threshold=0.5"))
    rows = pd.read_csv(tmp_path / "pe" / "generations.csv")
    assert (rows.prss_triggered == 1).all() and rows.prss_steps_reanchored.between(1, 6).all()
    assert (rows.wen_iterations == 2).all() and (rows.unet_evals_before == rows.wen_iterations + 2).all()
    assert metrics["unet_evals_per_image"] == 3 * 6 + 4

    # defaults: the tiny model's prompts are below the trigger (l_target 1): no optimisation, standard CFG
    run(config(tiny_model_dir, tmp_path / "d", "mitigation=prss"))
    run(config(tiny_model_dir, tmp_path / "none", "mitigation=none"))
    default = pd.read_csv(tmp_path / "d" / "generations.csv")
    assert (default.prss_triggered == 0).all() and (default.wen_iterations == 0).all()
    assert _png_diff(tmp_path / "d", tmp_path / "none", default.file) <= 1


def test_prss_ss_run_searches_the_paraphrase_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    metrics = run(config(tiny_model_dir, tmp_path / "ss", "mitigation=prss_ss",
                         f"mitigation.embedding.paraphrases={FIXTURE}",
                         "mitigation.embedding.l_target=1e-6", "mitigation.branches.target=0.1",
                         "mitigation.branches.threshold=0.5"))
    rows = pd.read_csv(tmp_path / "ss" / "generations.csv")
    assert (rows.unet_evals_before == 2 + 3).all() and metrics["unet_evals_per_image"] == 3 * 6 + 5  # all tried
    assert (rows.prss_triggered == 1).all() and (rows.ss_final_norm <= rows.ss_first_norm).all()
    step0 = pd.read_csv(tmp_path / "ss" / "trajectories.csv").query("step == 0")
    assert step0.d.to_numpy() ** 0.5 == pytest.approx(rows.ss_final_norm.to_numpy(), rel=1e-4)  # sampled with it
    assert rows.groupby("prompt_idx").ss_choice.nunique().max() >= 1 and rows.ss_choice.between(0, 3).all()


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def _error(tiny_model_dir: Path, run_dir: Path, *overrides: str) -> str:
    with pytest.raises(UserError) as caught:
        run(config(tiny_model_dir, run_dir, *overrides))
    assert "\n" not in str(caught.value) and not (run_dir / "images").exists()
    return str(caught.value)


def test_bad_input_is_refused_in_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert _error(tiny_model_dir, tmp_path / "a", "mitigation=prss_ss").startswith(
        "mitigation.embedding.paraphrases=None: give mitigation.embedding.paraphrases=PATH")
    assert _error(tiny_model_dir, tmp_path / "b", "mitigation=prss_ss",
                  "mitigation.embedding.paraphrases=/no/such.jsonl").startswith(
        "mitigation.embedding.paraphrases=/no/such.jsonl: no such file")
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"a red circle": ["a circle in red"]}))
    assert _error(tiny_model_dir, tmp_path / "c", "mitigation=prss_ss", f"mitigation.embedding.paraphrases={partial}"
                  ).startswith(f"mitigation.embedding.paraphrases={partial} has no paraphrases for 1 of 2 prompts "
                               "('a blue square')")
    assert _error(tiny_model_dir, tmp_path / "d", "mitigation=prss", "mitigation.branches.gate=image").startswith(
        "mitigation.branches.gate='image' must be one of sample, batch")
    assert _error(tiny_model_dir, tmp_path / "e", "mitigation=prss", "mitigation.branches.target=6").startswith(
        "mitigation.branches.target=6, threshold=5: need 0 <= target < threshold")


def test_other_families_are_refused_in_one_line(tiny_components) -> None:
    from diffusers import DDIMScheduler

    from memguard.families.dit import DiT
    from memguard.families.sd3 import SD3

    with pytest.raises(UserError, match=r"^mitigation=prss: mitigation.branches serves the sd, sdxl families, "
                                        "not dit"):
        DiT.check_baselines(Baselines(branches=PromptReanchoring()), "prss")
    with pytest.raises(UserError, match=r"^mitigation=prss_ss: mitigation.embedding serves the sd, sdxl families, "
                                        "not sd3"):
        SD3.check_baselines(Baselines(embedding=SemanticSearch(str(FIXTURE))), "prss_ss")


def test_the_gate_reads_eps_units_on_a_v_prediction_model() -> None:
    """The loop passes the step's eps coefficient ``a``: ``r = a ||out_c - out_u||``, so a v model's thresholds
    mean what an eps model's do; the combination itself is affine (weights summing to 1) in the raw outputs."""
    generator = torch.Generator().manual_seed(0)
    eps_u = torch.randn(1, 4, 8, 8, generator=generator)
    direction = torch.randn(1, 4, 8, 8, generator=generator)
    eps_c = eps_u + 2.0 * direction / direction.norm()  # ||eps_c - eps_u|| = 2
    eps_o = torch.randn(1, 4, 8, 8, generator=generator)
    cfg = eps_u + G * (eps_c - eps_u)
    reanchor = lambda a: PromptReanchoring(target=3.0, threshold=5.0).combine(eps_u, eps_c, [eps_o],
                                                                              torch.tensor([G]), 0, a)
    torch.testing.assert_close(reanchor(1.0), cfg)  # r = 2 < 3: CFG
    assert not torch.allclose(reanchor(2.0), cfg, atol=1e-3)  # r = 2 a = 4 > 3: re-anchored


def test_the_trigger_reads_raw_units_as_the_embedding_target_it_is_tied_to() -> None:
    """The trigger defaults to the embedding's ``l_target``, which Wen's optimisation and the search compare with
    the raw output difference; so the trigger reads the raw ``||out_o - out_u||`` on a v model too (a = 2 would
    double it in eps units and fire it), while the gate reads eps units."""
    generator = torch.Generator().manual_seed(1)
    eps_u = torch.randn(1, 4, 8, 8, generator=generator)
    direction = torch.randn(1, 4, 8, 8, generator=generator)
    eps_o = eps_u + 2.0 * direction / direction.norm()  # raw ||out_o - out_u|| = 2
    eps_c = eps_u + 4.0 * direction / direction.norm()  # raw r = 4: eps units 8 at a = 2
    for trigger, fired in ((3.0, False), (1.5, True)):
        pr = PromptReanchoring(target=3.0, threshold=5.0, trigger=trigger)
        pr.combine(eps_u, eps_c, [eps_o], torch.tensor([G]), 0, 2.0)
        assert pr.info()["prss_triggered"].tolist() == [int(fired)], trigger
        assert pr.info()["prss_steps_reanchored"].tolist() == [int(fired)]


def test_sdxl_searches_and_reanchors_per_image_with_its_pooled_embeddings() -> None:
    """SDXL is the sd family's case with two encoders: the search swaps every condition of the chosen text (its
    token and pooled embeddings), and an image's result is the same alone and in a batch."""
    from memguard.families import random_family

    family = random_family("sdxl")
    prompts = ["a red circle", "a blue square"]
    baselines = lambda: Baselines(embedding=SemanticSearch(str(FIXTURE), l_target=1e-6),
                                  branches=PromptReanchoring(target=0.01, threshold=1.0, trigger=1e-6))
    images, traj = generate_images(family, family.scheduler, Constant(G), prompts, [0, 1], 2, baselines=baselines())
    alone, one = generate_images(family, family.scheduler, Constant(G), prompts[1:], [1], 2, baselines=baselines())
    torch.testing.assert_close(alone[0], images[1], rtol=0, atol=1e-5)
    assert traj.unet_evals == 3 * 2 and traj.info["unet_evals_before"].tolist() == [5, 5]
    assert traj.info["ss_choice"][1] == one.info["ss_choice"][0] and traj.info["prss_steps_reanchored"].min() > 0
    search = SemanticSearch(str(FIXTURE), l_target=1e-6)
    cond, info = search(family, initial_noise([1], (4, 16, 16)), torch.tensor(999), family.encode(prompts[1:]),
                        family.null(1), prompts=prompts[1:])
    assert info["ss_choice"][0] > 0  # a paraphrase: every condition of it, pooled embedding and time ids included
    chosen = read_paraphrases(str(FIXTURE))[prompts[1]][int(info["ss_choice"][0]) - 1]
    assert set(cond) == {"encoder_hidden_states", "text_embeds", "time_ids"}
    for key, value in family.encode([chosen]).items():
        torch.testing.assert_close(cond[key], value)

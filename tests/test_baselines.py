"""Prompt baselines: deterministic per (prompt, seed), original prompt kept for scoring, composable with schedules."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import Tensor

from memguard.mitigations import Baselines
from memguard.mitigations.random_tokens import RandomTokens
from memguard.mitigations.ren import RenAttention
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


def _wen_run(model: Path, run_dir: Path, l_target: float, max_iters: int = 3, name: str = "wen_l1_per_image",
             *overrides: str) -> pd.DataFrame:
    run(config(model, run_dir, f"mitigation={name}", f"mitigation.embedding.l_target={l_target}",
               f"mitigation.embedding.max_iters={max_iters}", *overrides))
    return pd.read_csv(run_dir / "generations.csv")


def test_wen_lowers_the_first_step_norm_or_stops_at_the_cap_and_says_so(tiny_model_dir: Path, tmp_path: Path) -> None:
    plain = run(config(tiny_model_dir, tmp_path / "plain"))
    capped = _wen_run(tiny_model_dir, tmp_path / "capped", l_target=1e-6)  # unreachable
    assert (capped.wen_iterations == 3).all() and not capped.wen_reached_target.any()
    assert (capped.wen_final_norm < capped.wen_first_norm).all()  # it did descend
    traj = pd.read_csv(tmp_path / "capped" / "trajectories.csv").query("step == 0")
    assert (traj.d.to_numpy() ** 0.5 == pytest.approx(capped.wen_final_norm.to_numpy(), rel=1e-4))  # sampled with it
    metrics = json.loads((tmp_path / "capped" / "metrics.json").read_text())
    assert metrics["embedding_baseline"]["wen_reached_target"] == 0.0 and metrics["embedding_baseline"]["wen_iterations"] == 3
    first = capped.wen_first_norm.to_numpy()
    assert first ** 2 == pytest.approx(pd.read_csv(tmp_path / "plain" / "trajectories.csv").query("step == 0").d.to_numpy(), rel=1e-4)
    assert plain["n_images"] == 4

    assert (capped.unet_evals_before == 3 + 2).all()  # 1 null + 4 conditional forward passes
    assert metrics["unet_evals_per_image"] == 2 * metrics["steps"] + 5
    done = _wen_run(tiny_model_dir, tmp_path / "done", l_target=float(first.max()) + 1)  # already below target
    assert (done.wen_iterations == 0).all() and done.wen_reached_target.all() and (done.unet_evals_before == 2).all()
    shared = _wen_run(tiny_model_dir, tmp_path / "shared", 1e-6, 2, "wen_l1")  # a set's passes, per image
    assert (shared.wen_iterations == 2).all() and (shared.unet_evals_before == 4).all()


def test_wen_results_do_not_depend_on_batch_size(tiny_model_dir: Path, tmp_path: Path) -> None:
    target = float(_wen_run(tiny_model_dir, tmp_path / "probe", 1e-6, max_iters=0).wen_first_norm.median())
    one = _wen_run(tiny_model_dir, tmp_path / "b8", target)
    run(config(tiny_model_dir, tmp_path / "b1", "mitigation=wen_l1_per_image", f"mitigation.embedding.l_target={target}",
               "mitigation.embedding.max_iters=3", "batch_size=1"))
    other = pd.read_csv(tmp_path / "b1" / "generations.csv")
    assert one.wen_iterations.tolist() == other.wen_iterations.tolist()
    assert one.wen_final_norm.to_numpy() == pytest.approx(other.wen_final_norm.to_numpy(), rel=1e-4)


def _step0(components, attention) -> dict:
    """eps_u and eps_c at the first step of one tiny batch, with or without an attention baseline."""
    from memguard.families.sd import encode_prompts
    from memguard.guidance import Constant
    from memguard.sampling import initial_noise, sample

    seen = {}
    prompts = ["a red circle", "a blue square on a white background"]
    cond, unet = encode_prompts(components, prompts), components.unet
    uncond = encode_prompts(components, [""]).expand_as(cond)
    noise = initial_noise([0, 1], (4, 16, 16))

    def grab(step: dict) -> None:
        if step["step"] == 0:
            seen.update(eps_u=step["eps_u"].clone(), eps_c=step["eps_c"].clone())

    if attention is None:
        sample(unet, components.scheduler, cond, uncond, noise, Constant(7.5), 1, grab)
    else:
        lengths = torch.tensor(components.tokenizer(prompts, return_length=True).length)
        with attention.installed_on(unet, lengths, 77):
            sample(unet, components.scheduler, cond, uncond, noise, Constant(7.5), 1, grab)
    return seen


def test_ren_changes_the_conditional_attention_only(tiny_components) -> None:
    plain = _step0(tiny_components, None)
    identity = _step0(tiny_components, RenAttention(c1=1.0, mask_trailing=False))
    assert torch.allclose(identity["eps_c"], plain["eps_c"], atol=1e-5)  # the processor itself is exact
    ren = _step0(tiny_components, RenAttention(mask_branches="conditional"))
    assert torch.allclose(ren["eps_u"], plain["eps_u"], atol=1e-6)  # unconditional branch untouched
    assert (ren["eps_c"] - plain["eps_c"]).abs().max() > 1e-3
    assert RenAttention().keep_mask(torch.tensor([3, 5]), 6).tolist() == [[True] * 3 + [False] * 3, [True] * 5 + [False]]


def _ren_reference(attn, hidden: Tensor, context: Tensor, prompt_lengths: list[int], c1: float) -> Tensor:
    """Ren et al.'s edit written from their description and MemAttn's processor: per (half, prompt) row, logits
    q k^T / sqrt(d); positions at or after the conditional prompt's length set to -inf in every row; the start
    token's logit times c1 in the conditional rows; softmax; times v; output projection."""
    rows, heads = [], attn.heads
    half = hidden.shape[0] // 2
    for i in range(hidden.shape[0]):
        q = attn.to_q(hidden[i]).view(hidden.shape[1], heads, -1).transpose(0, 1)
        k = attn.to_k(context[i]).view(context.shape[1], heads, -1).transpose(0, 1)
        v = attn.to_v(context[i]).view(context.shape[1], heads, -1).transpose(0, 1)
        s = q @ k.transpose(1, 2) / q.shape[-1] ** 0.5
        s[..., prompt_lengths[i % half]:] = float("-inf")
        if i >= half:
            s[..., 0] = s[..., 0] * c1
        rows.append((s.softmax(-1) @ v).transpose(0, 1).reshape(hidden.shape[1], -1))
    return attn.to_out[0](torch.stack(rows))


def test_ren_masks_both_branches_like_a_reference_written_from_the_description(tiny_components) -> None:
    unet = tiny_components.unet
    name = next(n for n in unet.attn_processors if ".attn2." in n)
    attn = unet.get_submodule(name.removesuffix(".processor"))
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 6, attn.to_q.in_features, generator=generator)
    context = torch.randn(4, 77, attn.to_k.in_features, generator=generator)
    lengths = [3, 5]
    with torch.no_grad():
        with RenAttention(c1=1.25).installed_on(unet, torch.tensor(lengths), 77):
            ours = attn(hidden, encoder_hidden_states=context)
        want = _ren_reference(attn, hidden, context, lengths, 1.25)
    assert torch.allclose(ours, want, atol=1e-5)
    plain = _step0(tiny_components, None)
    both = _step0(tiny_components, RenAttention())
    assert (both["eps_u"] - plain["eps_u"]).abs().max() > 1e-4  # the unconditional branch is masked too
    with pytest.raises(ValueError, match="mask_branches='uncond' must be both or conditional"):
        RenAttention(mask_branches="uncond")


def test_ren_run_and_generate_restore_the_processors(tiny_components, tiny_model_dir: Path, tmp_path: Path) -> None:
    from memguard.guidance import Constant
    from memguard.sampling import generate_images

    before = {k: type(v) for k, v in tiny_components.unet.attn_processors.items()}
    images, _ = generate_images(tiny_components, tiny_components.scheduler, Constant(7.5), ["a cat"], [0], 2,
                                baselines=Baselines(attention=RenAttention()))
    assert {k: type(v) for k, v in tiny_components.unet.attn_processors.items()} == before
    run(config(tiny_model_dir, tmp_path / "ren", "mitigation=ren"))
    assert json.loads((tmp_path / "ren" / "metrics.json").read_text())["mitigation"] == "ren"


@pytest.mark.parametrize("name", ["rand_word", "rand_numb"])
def test_random_token_baselines_insert_four_items_by_default_as_at_inference_in_the_reference_code(name: str) -> None:
    from omegaconf import OmegaConf

    conf = OmegaConf.load(Path(__file__).parent.parent / "conf" / "mitigation" / f"{name}.yaml")
    assert conf.prompt.count == 4
    assert RandomTokens("number").count == 4
    extra = [w for w in RandomTokens("number")("a b c", 3, clip_tokenizer()).split(" ") if w.isdigit()]
    assert len(extra) == 4


def _wen_reference(unet, x_set: Tensor, t: Tensor, cond: Tensor, uncond: Tensor, target: float, lr: float,
                   iters: int) -> Tensor:
    """Wen et al.'s inference-time mitigation written from their description: one embedding for the prompt's
    images, the loss sqrt(sum over the images of ||eps_c - eps_u||^2), AdamW, the start token's gradient zeroed,
    at most ``iters`` steps, stop once the loss is at or below ``target``."""
    embedding = torch.nn.Parameter(cond.detach().clone())
    optimizer = torch.optim.AdamW([embedding], lr=lr)
    for _ in range(iters):
        squares = 0.0
        for x in x_set:
            with torch.no_grad():
                eps_u = unet(x[None], t, encoder_hidden_states=uncond).sample
            squares = squares + (unet(x[None], t, encoder_hidden_states=embedding).sample - eps_u).pow(2).sum()
        loss = squares.sqrt()
        if loss.item() <= target:
            break
        optimizer.zero_grad()
        loss.backward()
        embedding.grad[:, 0] = 0
        optimizer.step()
    return embedding.detach()


def test_wen_shared_embedding_matches_a_reference_written_from_the_description(tiny_components) -> None:
    """Compared in float64. AdamW's first step moves an element by ``lr * g / (|g| + eps)``, which is ``+-lr`` for
    any gradient well above ``eps = 1e-8``: an element whose gradient is a rounding error away from zero flips by
    ``2 lr`` when the batched and the per-image sums round differently, as float32 does on one CPU's vector unit
    and not another's. The map's slope is at most ``1 / eps``, so float64's rounding (~1e-16 of the gradient's
    terms) moves an element by ~``lr * 1e8 * 1e-16``-ish amounts (1e-8 measured), three orders below ``atol`` and
    seven below a flip: the comparison no longer depends on the CPU."""
    import copy

    from memguard.mitigations.wen import WenSharedEmbedding
    from memguard.families import as_family
    from memguard.families.sd import encode_prompts
    from memguard.sampling import initial_noise

    components = copy.deepcopy(tiny_components).to("cpu", torch.float64)
    unet, t = components.unet, torch.tensor(999)
    cond, uncond = encode_prompts(components, ["a red circle"]), encode_prompts(components, [""])
    x_set = initial_noise([0, 1, 2], (4, 16, 16), dtype=torch.float64)
    model, conditions = as_family(components), lambda e: {"encoder_hidden_states": e}
    wen = WenSharedEmbedding(l_target=1e-6, lr=0.05, max_iters=3)
    ours, info = wen.optimise(model, x_set, t, conditions(cond), conditions(uncond))
    want = _wen_reference(unet, x_set, t, cond, uncond, 1e-6, 0.05, 3)
    assert ours.dtype == want.dtype == torch.float64
    assert info["wen_iterations"] == 3 and not info["wen_reached_target"]
    assert (ours - cond).abs().max() > 1e-3 and torch.allclose(ours, want, rtol=0, atol=1e-5)
    per_image = _wen_reference(unet, x_set[:1], t, cond, uncond, 1e-6, 0.05, 3)
    assert not torch.allclose(ours, per_image, atol=1e-5)  # the set's norm, not one image's
    easy = WenSharedEmbedding(l_target=1e6, max_iters=3).optimise(model, x_set, t, conditions(cond), conditions(uncond))
    assert easy[1]["wen_iterations"] == 0 and torch.equal(easy[0], cond)


def test_wen_shared_embedding_is_one_per_prompt_and_independent_of_batch_size(tiny_model_dir: Path,
                                                                              tmp_path: Path) -> None:
    probe = _wen_run(tiny_model_dir, tmp_path / "probe", 1e-6, 0, "wen_l1")
    target = float(probe.wen_first_norm.min()) * 0.97
    whole = _wen_run(tiny_model_dir, tmp_path / "b8", target, 3, "wen_l1")
    single = _wen_run(tiny_model_dir, tmp_path / "b1", target, 3, "wen_l1", "batch_size=1")
    for frame in (probe, whole):  # one norm per prompt: every image of a prompt reports its set's figures
        assert frame.groupby("prompt_idx").wen_first_norm.nunique().eq(1).all()
    assert whole.wen_iterations.tolist() == single.wen_iterations.tolist()
    assert whole.wen_final_norm.to_numpy() == pytest.approx(single.wen_final_norm.to_numpy(), rel=1e-5)
    assert (whole.wen_iterations >= 1).all()
    import numpy as np
    from PIL import Image
    for file in whole.file:
        a = np.asarray(Image.open(tmp_path / "b8" / file), dtype=float)
        b = np.asarray(Image.open(tmp_path / "b1" / file), dtype=float)
        assert np.abs(a - b).max() <= 1


def test_wen_per_image_leaves_the_start_token_to_weight_decay_alone(tiny_components) -> None:
    """As Wen et al.'s code (``grad[:, [0]] * 0``): the start token gets no gradient step, only AdamW's decoupled
    decay ``(1 - lr * 0.01)`` per iteration; the other tokens move."""
    from memguard.mitigations.wen import WenEmbeddingOptimization
    from memguard.families import as_family
    from memguard.families.sd import encode_prompts
    from memguard.sampling import initial_noise

    cond = encode_prompts(tiny_components, ["a red circle", "a blue square"])
    uncond = encode_prompts(tiny_components, [""]).expand_as(cond)
    x = initial_noise([0, 1], (4, 16, 16))
    out, info = WenEmbeddingOptimization(l_target=1e-6, lr=0.05, max_iters=3)(
        as_family(tiny_components), x, torch.tensor(999), {"encoder_hidden_states": cond},
        {"encoder_hidden_states": uncond})
    moved = out["encoder_hidden_states"]
    assert info["wen_iterations"].tolist() == [3, 3]
    torch.testing.assert_close(moved[:, 0], cond[:, 0] * (1 - 0.05 * 0.01) ** 3, rtol=1e-6, atol=0)
    assert (moved[:, 1:] - cond[:, 1:]).abs().amax(dim=(1, 2)).min() > 1e-2

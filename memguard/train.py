"""Text-to-image denoiser training: the loss of Stable Diffusion, for the tiny scenario's model.

    loss = E_{x0, c, t, eps} || y - f_theta(x_t, t, tau(c')) ||^2,   x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,
    y = eps (eps-prediction, SD 1.x) or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (v-prediction, SD 2.x-768),
    c' = ""  with probability ``cond_dropout`` (so one network learns the unconditional and conditional
    predictions, as CFG needs), else c; with probability ``caption_noise`` c is first replaced by the caption
    of another training image drawn the same way (web captions such as LAION's often do not describe their image)

with t uniform over the scheduler's 1000 training timesteps and the scheduler's own noise schedule. The UNet
and the text encoder are trained together from scratch; sampling uses an exponential moving average of both.
"""

from __future__ import annotations

import copy
import json
import math
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from omegaconf import OmegaConf
from torch import Tensor
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from memguard.components import Components, clip_tokenizer, load_components, save_components, sd_scheduler
from memguard.errors import UserError, instantiate_checked
from memguard.metrics.alignment import save_attribute_net, train_attribute_net
from memguard.metrics.similarity import embed_files, load_images, nearest_references
from memguard.procedural import (
    TEXTURE_AMPLITUDE, dataset_digest, random_images, read_jsonl, read_metadata, write_dataset,
)
from memguard.runs.folder import atomic_path, atomic_write_text


def tiny_components(seed: int = 0, size: int = 16, width: int = 32, text_width: int = 64,
                    beta_schedule: str = "squaredcos_cap_v2", prediction_type: str = "v_prediction") -> Components:
    """The tiny scenario's architecture, untrained: a pixel-space UNet2DConditionModel (no VAE) with
    cross-attention at its inner level over a 2-layer CLIPTextModel, the real CLIP tokenizer, and SD's scheduler
    config with, by default, the cosine noise schedule and v-prediction.

    Why not SD 1.x's scaled-linear schedule with eps-prediction: trained that way (and with the cosine schedule
    and eps-prediction), the tiny model drew shape and position from the caption but took its background colour
    from the seed: at 16 px the per-channel mean of the initial noise (std 1/16) is as large as what is left of
    the image at t = T, and an eps-prediction loss puts almost no weight on getting the image right there.
    With v-prediction (SD 2.x-768's parameterisation) the loss at high noise is in effect a loss on the image,
    so the model makes its colours from the caption; the cosine schedule (abar_T = 2e-9, zero terminal SNR in
    effect) is the schedule v-prediction makes well-posed.
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=size, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(width, 2 * width), norm_num_groups=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_width, attention_head_dim=8,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=text_width, intermediate_size=2 * text_width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407,
    ))
    return Components(unet, None, text_encoder, clip_tokenizer(), sd_scheduler(beta_schedule, prediction_type))


@dataclass
class TrainSettings:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    cond_dropout: float = 0.1
    caption_noise: float = 0.0
    ema_decay: float = 0.999
    seed: int = 0


def noised_and_target(x0: Tensor, noise: Tensor, abar: Tensor, v_prediction: bool) -> tuple[Tensor, Tensor]:
    """``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps`` and the regression target: ``eps``, or for v-prediction
    ``v = sqrt(abar) eps - sqrt(1 - abar) x0``. ``abar`` broadcasts over ``x0`` (e.g. ``(B, 1, 1, 1)``)."""
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    return x_t, abar.sqrt() * noise - (1 - abar).sqrt() * x0 if v_prediction else noise


def tokenize(components: Components, captions: Sequence[str]) -> Tensor:
    """Token ids ``(N, 77)`` as the sampler encodes prompts (padding to max length, truncation)."""
    tok = components.tokenizer
    return tok(list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def _captioned(idx: Tensor, probabilities: Tensor, settings: TrainSettings, generator: torch.Generator) -> Tensor:
    """Whose caption each drawn image is trained with: its own, or with probability ``caption_noise`` another
    image's. Without caption noise nothing is drawn, so such recipes keep their random stream (bitwise)."""
    if settings.caption_noise <= 0:
        return idx
    swap = torch.rand(len(idx), generator=generator) < settings.caption_noise
    other = torch.multinomial(probabilities, len(idx), replacement=True, generator=generator)
    return torch.where(swap, other, idx)


@contextmanager
def _deferred_interrupt(active: bool) -> Iterator[list[bool]]:
    """Ctrl-C during training is noted and acted on between steps, so a checkpoint never holds half a step."""
    noted: list[bool] = []
    if not active or threading.current_thread() is not threading.main_thread():
        yield noted
        return
    previous = signal.signal(signal.SIGINT, lambda *_: noted.append(True))
    try:
        yield noted
    finally:
        signal.signal(signal.SIGINT, previous)


def _save_checkpoint(path: str | Path, state: dict[str, Any], generator: torch.Generator, settings: TrainSettings,
                     losses: list[float], step: int) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {name: obj.state_dict() for name, obj in state.items()}
    blob |= {"generator": generator.get_state(), "settings": vars(settings), "losses": losses, "step": step}
    with atomic_path(path) as tmp:  # a run killed while saving keeps the previous checkpoint
        torch.save(blob, tmp)


def _resume(path: str | Path, state: dict[str, Any], generator: torch.Generator, settings: TrainSettings,
            losses: list[float]) -> int:
    """Load a checkpoint written by :func:`_save_checkpoint` into ``state``; the step to go on from (0 if none)."""

    path = Path(path)
    if not path.is_file():
        return 0
    blob = torch.load(path, weights_only=False)
    if blob["settings"] != vars(settings):
        changed = {k: (blob["settings"].get(k), v) for k, v in vars(settings).items() if blob["settings"].get(k) != v}
        raise UserError(f"{path} was written with other training settings {changed} (saved, now); rerun with the "
                        "saved ones to resume, or delete the checkpoint to start again")
    for name, obj in state.items():
        obj.load_state_dict(blob[name])
    generator.set_state(blob["generator"])
    losses.extend(blob["losses"])
    return int(blob["step"])


def train_denoiser(components: Components, images: Tensor, captions: Sequence[str], weights: Sequence[int],
                   settings: TrainSettings, progress: bool = True, checkpoint: str | Path | None = None,
                   checkpoint_every: int = 100, stop_after: int | None = None) -> list[float]:
    """Train ``components.unet`` and ``components.text_encoder`` in place; they end holding the EMA weights.

    ``images``: ``(N, C, H, W)`` in ``[-1, 1]`` (the UNet's input space); ``captions[i]`` describes image ``i``
    and ``weights[i]`` is how often it occurs in the training set (a duplicated image has weight > 1).
    Returns the loss per step.

    With ``checkpoint`` (a file), the whole training state (weights, EMA, optimizer, learning-rate schedule,
    random stream, losses) is saved there every ``checkpoint_every`` steps, on Ctrl-C and after ``stop_after``
    steps (then it returns ``[]`` without finishing), and a later call with the same file resumes from it: the
    result is bitwise the uninterrupted run's. The file is removed when training ends.
    """
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    ids, empty = tokenize(components, captions), tokenize(components, [""])
    probabilities = torch.tensor(weights, dtype=torch.float64)
    alphas_cumprod = components.scheduler.alphas_cumprod.float()
    train_steps = len(alphas_cumprod)
    v_prediction = components.scheduler.config.prediction_type == "v_prediction"
    networks = torch.nn.ModuleList([components.unet, components.text_encoder]).train().requires_grad_(True)
    ema = copy.deepcopy(networks).requires_grad_(False)
    optimizer = torch.optim.AdamW(networks.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / settings.warmup) * (
        0.55 + 0.45 * math.cos(math.pi * k / settings.steps)))

    losses: list[float] = []
    state = {"networks": networks, "ema": ema, "optimizer": optimizer, "scheduler": scheduler}
    first = _resume(checkpoint, state, generator, settings, losses) if checkpoint is not None else 0
    with _deferred_interrupt(checkpoint is not None) as interrupted, tqdm(
            range(first, settings.steps), desc="training", unit="step", disable=not progress, initial=first,
            total=settings.steps) as bar:
        for step in bar:
            if checkpoint is not None and step > first and (step % checkpoint_every == 0 or step == stop_after):
                _save_checkpoint(checkpoint, state, generator, settings, losses, step)
                if step == stop_after:
                    return []
            idx = torch.multinomial(probabilities, settings.batch_size, replacement=True, generator=generator)
            x0 = images[idx]
            drop = torch.rand(len(idx), generator=generator) < settings.cond_dropout
            tokens = torch.where(drop[:, None], empty, ids[_captioned(idx, probabilities, settings, generator)])
            t = torch.randint(0, train_steps, (len(idx),), generator=generator)
            noise = torch.randn(x0.shape, generator=generator)
            abar = alphas_cumprod[t].view(-1, 1, 1, 1)
            x_t, target = noised_and_target(x0, noise, abar, v_prediction)
            text = components.text_encoder(tokens)[0]
            loss = F.mse_loss(components.unet(x_t, t, encoder_hidden_states=text).sample, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(networks.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            decay = min(settings.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema.parameters(), networks.parameters()):
                    e.lerp_(p, 1 - decay)
            losses.append(loss.item())
            if step % 10 == 0:
                bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
            if interrupted:
                _save_checkpoint(checkpoint, state, generator, settings, losses, step + 1)
                raise KeyboardInterrupt(f"training stopped after step {step + 1}; the same command resumes it "
                                        f"from {checkpoint}")

    with torch.no_grad():
        for p, e in zip(networks.parameters(), ema.parameters()):
            p.copy_(e)
    networks.eval().requires_grad_(False)
    if checkpoint is not None:
        Path(checkpoint).unlink(missing_ok=True)
    return losses


def load_training_set(data_dir: str | Path) -> tuple[Tensor, list[str], list[int]]:
    """A captioned image folder (``metadata.jsonl`` with ``file_name``, ``text`` and optional ``repeats``) as
    images ``(N, 3, H, W)`` in ``[-1, 1]``, captions and repeat counts."""

    root = Path(data_dir)
    rows = read_jsonl(root / "metadata.jsonl")
    images = load_images([root / r["file_name"] for r in rows]) * 2 - 1
    return images, [r["text"] for r in rows], [int(r.get("repeats", 1)) for r in rows]


def calibrate_copy_threshold(data_dir: str | Path, embedder: Any, size: int, n: int = 2000, seed: int = 99,
                             percentile: float = 99.0, design: str = "tiny",
                             texture_amplitude: float = TEXTURE_AMPLITUDE) -> float:
    """The ``percentile`` of the similarity of ``n`` fresh procedural images (drawn with ``seed``, so never
    trained on) to their nearest training image: above it, a generation is closer to a training image than
    99% of new images are, i.e. a copy."""

    root = Path(data_dir)
    pixels, _ = random_images(n, seed, size, design, texture_amplitude)
    fresh = embedder(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255)
    references = embed_files([root / r.file_name for r in read_metadata(root)], embedder)
    return float(np.percentile(nearest_references(fresh, references).similarity.numpy(), percentile))


def _resumable_data(out: Path, data: dict[str, Any], model: dict[str, Any], init_from: str | Path | None) -> Path:
    """``out/data``, written unless an interrupted run of the same recipe (``out/recipe.json``) left it there."""

    recipe = {"data": data, "model": model, "init_from": None if init_from is None else str(init_from)}
    if (out / "recipe.json").is_file():
        saved = json.loads((out / "recipe.json").read_text())
        if saved != recipe:
            raise UserError(f"{out} holds an interrupted run of another recipe ({out / 'recipe.json'}: {saved}); "
                            "rerun it with the same dataset, train.model and train.init_from to resume, or choose "
                            "another train.output_dir")
        return out / "data"
    data_dir = write_dataset(out / "data", **data)
    atomic_write_text(out / "recipe.json", json.dumps(recipe, indent=2) + "\n")
    return data_dir


def train_tiny(output_dir: str | Path, data: dict[str, Any], model: dict[str, Any], settings: TrainSettings,
               similarity: Any, alignment: dict[str, Any] | None = None, fp16_weights: bool = True,
               progress: bool = True, init_from: str | Path | None = None) -> Path:
    """The tiny scenario's model: write the procedural dataset to ``output_dir/data``, train the denoiser on it,
    train the attribute classifier (``alignment.pt``) on fresh procedural images, calibrate the copy threshold
    of the ``similarity`` embedder, and save a diffusers folder ``output_dir/model`` (weights stored as float16
    to halve the checkpoint, or float32; loaded as float32) with ``memguard_train.json`` recording the dataset
    and its digest, architecture, settings, time, final loss, classifier accuracy and threshold.

    From nothing (``model`` builds :func:`tiny_components`), or, with ``init_from``, fine-tuning the trained
    folder there (the two-stage recipe: pre-train on a large diverse set, then fine-tune on a small one until
    it memorizes); ``model`` is then ignored and the record keeps the earlier stage's record under ``init``."""

    out = Path(output_dir)
    if (out / "model").exists():
        raise FileExistsError(f"{out / 'model'} exists; choose another output folder")
    data_dir = _resumable_data(out, data, model, init_from)
    images, captions, repeats = load_training_set(data_dir)
    init = None
    if init_from is not None:
        components = load_components(init_from)
        init = {"path": str(init_from), "record": json.loads((Path(init_from) / "memguard_train.json").read_text())}
        model = init["record"]["model"]
    else:
        components = tiny_components(**model)
    started = time.perf_counter()
    losses = train_denoiser(components, images, captions, repeats, settings, progress, out / "checkpoint.pt")
    seconds = time.perf_counter() - started
    if fp16_weights:
        components.to("cpu", torch.float16)
    folder = save_components(components, out / "model")
    design, amplitude = data.get("design", "tiny"), data.get("texture_amplitude", TEXTURE_AMPLITUDE)
    net, accuracy = train_attribute_net(size=data.get("size", 16), design=design, texture_amplitude=amplitude,
                                        **(alignment or {}))
    save_attribute_net(net, accuracy, folder / "alignment.pt")
    record = {"data": data, "dataset_digest": dataset_digest(data_dir), "model": model, "settings": vars(settings),
              "seconds": round(seconds, 1), "threads": torch.get_num_threads(),
              "final_loss_mean_last_100": sum(losses[-100:]) / len(losses[-100:]),
              "weights_dtype": "float16" if fp16_weights else "float32",
              "alignment_held_out_accuracy": accuracy,
              "copy_threshold": {"embedder": similarity.name, "percentile": 99.0,
                                 "value": calibrate_copy_threshold(data_dir, similarity, data.get("size", 16),
                                                                   design=design, texture_amplitude=amplitude)}}
    if init is not None:
        record["init"] = init
    (folder / "memguard_train.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "losses.json").write_text(json.dumps(losses))
    return folder


def train_from_config(cfg: Any) -> Path:
    """``memguard train scenario=tiny`` (or ``scenario=tiny_ft train=pretrain|finetune``, or ``scenario=tiny2
    train=tiny2_pretrain|tiny2_finetune``, the two-stage recipes in conf/train/): :func:`train_tiny` with the
    ``dataset`` and ``train`` keys; ``train.init_from`` fine-tunes."""

    if cfg.get("train") is None or cfg.get("dataset") is None:
        raise UserError(f"scenario={cfg.scenario.name} has no training recipe (train, dataset); "
                        "`memguard train` trains scenario=tiny, or scenario=tiny_ft with train=pretrain, then "
                        "train=finetune (scenario=tiny2: train=tiny2_pretrain, then train=tiny2_finetune)")
    if cfg.train.threads:
        torch.set_num_threads(int(cfg.train.threads))
    data = {k: v for k, v in OmegaConf.to_container(cfg.dataset, resolve=True).items()
            if k not in ("_target_", "folder", "digest")}
    settings = TrainSettings(**OmegaConf.to_container(cfg.train.settings, resolve=True))
    init_from = cfg.train.get("init_from")
    if init_from is not None and not (Path(init_from) / "memguard_train.json").is_file():
        raise UserError(f"train.init_from={init_from!r} holds no model trained by `memguard train`; train the "
                        "first stage there (e.g. `memguard train scenario=tiny_ft train=pretrain`) or point "
                        "train.init_from at one")
    try:
        folder = train_tiny(cfg.train.output_dir, data, dict(cfg.train.model), settings,
                            instantiate_checked(cfg.metrics.similarity, "metrics.similarity"),
                            dict(cfg.train.alignment), fp16_weights=bool(cfg.train.get("fp16_weights", True)),
                            progress=cfg.progress, init_from=init_from)
    except FileExistsError as err:
        raise UserError(f"train.output_dir: {err}") from err
    print(f"trained model in {folder}; to make it the tiny scenario's model: model.path={folder} "
          f"dataset.digest={json.loads((folder / 'memguard_train.json').read_text())['dataset_digest']}")
    return folder

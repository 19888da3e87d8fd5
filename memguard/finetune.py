"""``memguard finetune``: diffusers' text-to-image fine-tuning recipe, UNet only, for the paper's scenarios 1, 2, 5.

    loss = || y - f_theta(x_t, t, tau(c)) ||^2,  x_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps,  z = VAE(x) * s

with ``y`` the model's own target (eps or v), the text encoder and VAE frozen, AdamW on the UNet. Images are
resized (shorter side) and centre-cropped to ``resolution``. It runs under ``accelerate launch`` on several GPUs
(each process draws its own batches), saves ``checkpoints/step-N`` every ``checkpoint_every`` steps and resumes
from the latest one when re-run; the result is a diffusers folder ``model-step-N`` that ``model.path`` takes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

from memguard.components import load_components, save_components
from memguard.errors import UserError
from memguard.metrics.similarity import load_images
from memguard.procedural import read_jsonl
from memguard.train import noised_and_target, tokenize

IMAGENETTE = {"n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player",
              "n03000684": "chain saw", "n03028079": "church", "n03394916": "French horn",
              "n03417042": "garbage truck", "n03425413": "gas pump", "n03445777": "golf ball",
              "n03888605": "parachute"}


@dataclass
class FinetuneSettings:
    steps: int = 100000
    batch_size: int = 16
    lr: float = 1e-5
    resolution: int = 256
    checkpoint_every: int = 5000
    gradient_accumulation: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16
    max_grad_norm: float = 1.0
    seed: int = 0


def captioned_images(data: str | Path, template: str | None = None) -> list[tuple[Path, str]]:
    """``metadata.jsonl`` (``file_name``, ``text``) under ``data``; or, with ``template`` (e.g. "An image of
    {}"), an Imagenette-style folder of class subfolders named by WordNet id."""
    root = Path(data).expanduser()
    if template is not None:
        pairs = [(f, template.format(IMAGENETTE.get(d.name, d.name))) for d in sorted(root.iterdir()) if d.is_dir()
                 for f in sorted(d.iterdir()) if f.suffix.lower() in (".jpg", ".jpeg", ".png")]
    elif (root / "metadata.jsonl").is_file():
        pairs = [(root / r["file_name"], r["text"]) for r in read_jsonl(root / "metadata.jsonl")]
    else:
        raise UserError(f"finetune.data={str(data)!r} has no metadata.jsonl (file_name, text per line); "
                        "or set finetune.template for a folder of class subfolders")
    if not pairs:
        raise UserError(f"finetune.data={str(data)!r} holds no images")
    return pairs


def load_batch(pairs: list[tuple[Path, str]], resolution: int) -> torch.Tensor:
    """Images resized (shorter side, bilinear, antialias) and centre-cropped, in ``[-1, 1]``."""
    from torchvision.transforms.v2 import functional as TF  # start-up: torchvision loads only when a fine-tune runs

    images = [TF.center_crop(TF.resize(load_images([f]), [resolution], antialias=True), [resolution, resolution])
              for f, _ in pairs]
    return torch.cat(images) * 2 - 1


def latest_checkpoint(folder: Path) -> tuple[int, Path | None]:
    found = sorted(((int(p.name.removeprefix("step-")), p) for p in folder.glob("step-*")), key=lambda x: x[0])
    return found[-1] if found else (0, None)


def finetune(cfg: Any) -> Path:
    """Fine-tune ``cfg.finetune.base_model``'s UNet on ``cfg.finetune.data``; return the saved model folder."""
    from accelerate import Accelerator  # start-up: accelerate loads only when a fine-tune runs

    if cfg.get("finetune") is None:
        raise UserError(f"scenario={cfg.scenario.name} has no finetune section; fine-tunable: laion10k, laion100k, "
                        "imagenette")
    spec = cfg.finetune
    settings = FinetuneSettings(**OmegaConf.to_container(spec.settings, resolve=True))
    out = Path(spec.output_dir)
    final = out / f"model-step-{settings.steps}"
    if final.exists():
        raise UserError(f"finetune.output_dir: {final} exists; choose another output folder or more steps")
    pairs = captioned_images(spec.data, spec.get("template"))
    accelerator = Accelerator(gradient_accumulation_steps=settings.gradient_accumulation,
                              mixed_precision=settings.mixed_precision)
    components = load_components(spec.base_model, accelerator.device, key="finetune.base_model")
    unet = components.unet.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.lr)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    start, checkpoint = latest_checkpoint(out / "checkpoints")
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        accelerator.print(f"resuming from {checkpoint}")
    alphas_cumprod = components.scheduler.alphas_cumprod.to(accelerator.device)
    v_prediction = components.scheduler.config.prediction_type == "v_prediction"

    for step in tqdm(range(start, settings.steps), desc="fine-tuning", initial=start, total=settings.steps,
                     disable=not (accelerator.is_main_process and cfg.progress)):
        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step * accelerator.num_processes
                                                  + accelerator.process_index)
        batch = [pairs[i] for i in torch.randint(len(pairs), (settings.batch_size,), generator=generator)]
        with accelerator.accumulate(unet):
            with torch.no_grad():
                pixels = load_batch(batch, settings.resolution).to(accelerator.device)
                vae = components.vae
                z = pixels if vae is None else vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                text = components.text_encoder(tokenize(components, [c for _, c in batch]).to(accelerator.device))[0]
            noise = torch.randn(z.shape, generator=generator).to(z.device)
            t = torch.randint(len(alphas_cumprod), (len(z),), generator=generator).to(z.device)
            abar = alphas_cumprod[t].view(-1, 1, 1, 1)
            x_t, target = noised_and_target(z, noise, abar, v_prediction)
            loss = F.mse_loss(unet(x_t, t, encoder_hidden_states=text).sample.float(), target.float())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(unet.parameters(), settings.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
            accelerator.save_state(str(out / "checkpoints" / f"step-{step + 1}"))

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        components.unet = accelerator.unwrap_model(unet).eval().requires_grad_(False)
        save_components(components, final)
        (final / "memguard_finetune.json").write_text(json.dumps(
            {"base_model": str(spec.base_model), "data": str(spec.data), "settings": vars(settings)}, indent=2))
        accelerator.print(f"fine-tuned model in {final}; use it with model.path={final}")
    return final

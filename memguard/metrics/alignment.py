"""Prompt alignment: how well an image shows what its prompt asks for.

Two scorers with one interface, ``scorer(images (B, 3, H, W) in [0, 1], prompts) -> (B,)``, each named in every
output:

- ``clip[...]`` (:class:`ClipScorer`): the raw cosine between open_clip image and text embeddings (about 0.3
  for Stable Diffusion images, the scale of the paper's tables; torchmetrics' ``CLIPScore`` is 100x this and
  clipped at 0), from a local weights file.
- ``attributes[...]`` (:class:`AttributeScorer`): for the tiny scenario's procedural captions
  (``"a red circle on a grey background"``), the mean over shape, colour and background of the probability a
  small classifier, trained on the generator's own labels, gives the prompt's value. Its held-out accuracy
  is stored with its weights and reported with every score.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memguard.components import resolve_device
from memguard.errors import UserError
from memguard.procedural import ATTRIBUTES, DESIGNS, TEXTURE_AMPLITUDE, random_images

OPEN_CLIP_HELP = ("open_clip weights are a local file: e.g. the open_clip_pytorch_model.bin of "
                  "laion/CLIP-ViT-g-14-laion2B-s12B-b42K (model ViT-g-14) or of laion/CLIP-ViT-B-16-laion2B-s34B-b88K "
                  "(model ViT-B-16), fetched on a machine with network")
CAPTION = re.compile(r"^a (?P<colour>\w+) (?P<shape>\w+) on a (?P<background>\w+) background\b")
CAPTION2 = re.compile(r"^a picture with (?P<ink>\w+) (?P<pattern>\w+)\b")  # procedural design tiny2


class Scorer:
    """Maps images ``(B, 3, H, W)`` in ``[0, 1]`` and their prompts to one score per image."""

    name: str = "scorer"

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        raise NotImplementedError


def load_open_clip(model: str, path: str | Path, device: torch.device, model_config: str | Path | None,
                   key: str, model_key: str, help_text: str, examples: str) -> tuple[Any, Any]:
    """An open_clip ``model`` (its registry name; ``model_config`` adds a config JSON) with the weights in the
    local file ``path``, and its preprocessing; each failure a UserError naming ``key`` / ``model_key``."""
    import open_clip  # start-up: open_clip loads only for a CLIP network

    if model_config is not None:
        open_clip.add_model_config(Path(model_config).expanduser())
    if model not in open_clip.list_models():
        raise UserError(f"{model_key}={model!r} is not an open_clip model ({examples})")
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"{key}={str(path)!r} is not a file; {help_text}")
    try:
        network, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=str(file), device=device)
    except Exception as err:  # noqa: BLE001  (any failure: not weights of this model)
        raise UserError(f"{key}={str(path)!r} does not hold {model} weights ({str(err).splitlines()[0][:200]}); "
                        f"{help_text}") from err
    return network, preprocess


class ClipScorer(Scorer):
    """Cosine of L2-normalised open_clip embeddings, ``<f(image), g(prompt)>``, with the model's own
    preprocessing (resize, centre crop, normalise) and tokenizer."""

    def __init__(self, model: str, path: str | Path, device: str | torch.device = "cpu",
                 model_config: str | Path | None = None, key: str = "metrics.alignment.path") -> None:
        import open_clip  # start-up: open_clip loads only for a CLIP score

        device = resolve_device(device)
        self.model, self.preprocess = load_open_clip(model, path, device, model_config, key, "metrics.alignment.model",
                                                     OPEN_CLIP_HELP, "e.g. ViT-B-16, ViT-g-14")
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model)
        self.device = device
        self.name = f"clip[{model}, {Path(path).expanduser().name}]"
        self.transform = self.preprocess  # files: each PIL image through the model's own preprocessing

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        # start-up: torchvision loads only for a CLIP score
        from torchvision.transforms.v2.functional import to_pil_image

        return self.score(torch.stack([self.preprocess(to_pil_image(im.clamp(0, 1))) for im in images]), prompts)

    @torch.no_grad()
    def score(self, pixels: Tensor, prompts: Sequence[str]) -> Tensor:
        """Scores of images already through :attr:`preprocess`."""
        image = F.normalize(self.model.encode_image(pixels.to(self.device)).float(), dim=-1)
        text = F.normalize(self.model.encode_text(self.tokenizer(list(prompts)).to(self.device)).float(), dim=-1)
        return (image * text).sum(dim=-1).cpu()


class AttributeNet(nn.Module):
    """A small CNN with one softmax head per procedural attribute; ``features`` is its 128-d penultimate layer."""

    def __init__(self, attributes: dict[str, Sequence[str]] = ATTRIBUTES, size: int = 16) -> None:
        super().__init__()
        self.attributes = {k: list(v) for k, v in attributes.items()}
        self.size = size
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(), nn.Flatten(),
            nn.Linear(64 * (size // 4) ** 2, 128), nn.SiLU(),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(128, len(v)) for k, v in self.attributes.items()})

    def features(self, images: Tensor) -> Tensor:
        x = F.interpolate(images.float(), size=(self.size, self.size), mode="bilinear", antialias=True)
        return self.body(x * 2 - 1)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        h = self.features(images)
        return {k: head(h) for k, head in self.heads.items()}


def train_attribute_net(n_train: int = 20000, n_test: int = 2000, seed: int = 1234, size: int = 16,
                        epochs: int = 4, batch_size: int = 128, design: str = "tiny",
                        texture_amplitude: float = TEXTURE_AMPLITUDE) -> tuple[AttributeNet, dict[str, float]]:
    """Train an :class:`AttributeNet` on fresh procedural images of ``design`` (their labels come with them),
    one head per attribute its captions name, and measure its per-attribute accuracy on ``n_test`` further
    images it never saw."""

    attributes = DESIGNS[design]

    def labelled(n: int, s: int) -> tuple[Tensor, dict[str, Tensor]]:
        pixels, samples = random_images(n, s, size, design, texture_amplitude)
        labels = {k: torch.tensor([list(v).index(getattr(x, k)) for x in samples]) for k, v in attributes.items()}
        return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255, labels

    torch.manual_seed(seed)
    x_train, y_train = labelled(n_train, seed)
    x_test, y_test = labelled(n_test, seed + 1)
    net = AttributeNet(attributes, size=size)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        for idx in torch.randperm(n_train).split(batch_size):
            logits = net(x_train[idx])
            loss = sum(F.cross_entropy(logits[k], y_train[k][idx]) for k in logits)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        logits = net(x_test)
    accuracy = {k: float((logits[k].argmax(1) == y_test[k]).float().mean()) for k in logits}
    return net, accuracy


def save_attribute_net(net: AttributeNet, accuracy: dict[str, float], path: str | Path) -> None:
    torch.save({"state_dict": net.state_dict(), "attributes": net.attributes, "size": net.size,
                "held_out_accuracy": accuracy}, path)


def load_attribute_net(path: str | Path, key: str = "metrics.alignment.path") -> tuple[AttributeNet, dict[str, float]]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"{key}={str(path)!r} is not a file; the tiny model folder ships alignment.pt "
                        "(`memguard train` writes it)")
    try:
        saved = torch.load(file, weights_only=True)
        net = AttributeNet(saved["attributes"], saved["size"])
        net.load_state_dict(saved["state_dict"])
    except Exception as err:
        raise UserError(f"{key}={str(path)!r} is not an attribute classifier written by memguard ({err})") from err
    return net.eval(), saved["held_out_accuracy"]


class AttributeScorer(Scorer):
    """Mean over attributes of the classifier's probability of the prompt's value:
    ``(p(shape|x) + p(colour|x) + p(background|x)) / 3``, in ``[0, 1]``; prompts must be procedural captions."""

    def __init__(self, path: str | Path, key: str = "metrics.alignment.path") -> None:
        self.net, self.accuracy = load_attribute_net(path, key)
        self.name = f"attributes[{Path(path).name}, held-out accuracy " + ", ".join(
            f"{k} {v:.3f}" for k, v in self.accuracy.items()) + "]"

    def targets(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        caption = CAPTION2 if set(self.net.attributes) == set(DESIGNS["tiny2"]) else CAPTION
        parsed = [caption.match(p) for p in prompts]
        bad = [p for p, m in zip(prompts, parsed) if m is None or any(
            m[k] not in v for k, v in self.net.attributes.items())]
        if bad:
            raise UserError(f"the attribute scorer reads procedural captions ('a red circle on a grey background', "
                            f"or for tiny2 'a picture with red stripes'), not {bad[0]!r}; use it with scenario=tiny, "
                            "tiny_ft or tiny2 only")
        return {k: torch.tensor([v.index(m[k]) for m in parsed]) for k, v in self.net.attributes.items()}

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        targets = self.targets(prompts)
        probs = {k: v.softmax(dim=1) for k, v in self.net(images).items()}
        return torch.stack([probs[k].gather(1, targets[k][:, None])[:, 0] for k in probs]).mean(dim=0)

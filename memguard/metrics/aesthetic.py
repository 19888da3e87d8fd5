"""Image quality without a reference: the LAION aesthetic predictor, as MemBench scores general prompts.

    aesthetic(x) = MLP(e / ||e||),  e = CLIP ViT-L/14 image embedding of x (OpenAI weights)

on a 1-10 scale (how much people like an image on average; LAION-Aesthetics v1, "sac+logos+ava1"). This is the
predictor MemBench (Hong et al.) ships and calls on every generation: chunsanHong/MemBench_code at commit
f22a0fdcd24fa0f4a43bf7b9a8e42c8c78af302f, ``aesthetic/model.py`` lines 34-55 (the MLP: five linear layers
768-1024-128-64-16-1, dropout between the first four and no activation), 78-83 (``normalized``: the L2 norm of
the embedding, a zero norm left as 1), 94 (``clip.load("ViT-L/14")`` and its preprocessing), 106-113
(``predict_2``: embed, normalise, MLP); ``run_mitigation.py`` lines 168-170 (one score per image, the mean per
prompt). Weights: ``aesthetic/sac+logos+ava1-l14-linearMSE.pth`` of that commit (3,714,759 bytes, sha256
21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0; its tensors were saved on a CUDA device and
are mapped to the CPU here), and OpenAI's CLIP ViT-L/14, loaded with open_clip as ``ViT-L-14-quickgelu`` (the
OpenAI models use QuickGELU) from a local file, with the model's own preprocessing (resize 224 bicubic,
centre crop, OpenAI mean/std: what ``clip.load`` returns).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memguard.components import resolve_device
from memguard.errors import UserError
from memguard.metrics.alignment import load_open_clip

HEAD_HELP = ("the aesthetic head is sac+logos+ava1-l14-linearMSE.pth from github.com/chunsanHong/MemBench_code "
             "(aesthetic/, commit f22a0fd); `memguard fetch ... metrics=paper_plus` fetches it")
CLIP_HELP = ("the aesthetic predictor's CLIP is OpenAI's ViT-L/14: open_clip_pytorch_model.bin of "
             "timm/vit_large_patch14_clip_224.openai (open_clip ViT-L-14, tag openai); `memguard fetch ... "
             "metrics=paper_plus` fetches it")


def aesthetic_head(width: int = 768) -> nn.Sequential:
    """MemBench's ``MLP.layers`` (aesthetic/model.py lines 40-55): the state dict's keys are ``layers.<i>``."""
    return nn.Sequential(nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))


def load_head(path: str | Path, key: str = "metrics.aesthetic.path") -> nn.Sequential:
    """The MLP head from its ``.pth`` state dict (keys ``layers.0.weight`` ... ``layers.7.bias``)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"{key}={str(path)!r} is not a file; {HEAD_HELP}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
        state = {k.removeprefix("layers."): v for k, v in state.items()}
        head = aesthetic_head(int(state["0.weight"].shape[1]))
        head.load_state_dict(state)
    except Exception as err:  # noqa: BLE001  (any failure: not that file)
        raise UserError(f"{key}={str(path)!r} is not the aesthetic MLP's state dict "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}); {HEAD_HELP}") from err
    return head.eval()


class AestheticScorer:
    """One aesthetic score per image (module docstring); ``transform`` is the CLIP model's own preprocessing."""

    def __init__(self, path: str | Path, clip_path: str | Path, clip_model: str = "ViT-L-14-quickgelu",
                 device: str | torch.device = "cpu", model_config: str | Path | None = None) -> None:
        device = resolve_device(device)
        self.head = load_head(path).to(device)
        self.model, self.transform = load_open_clip(clip_model, clip_path, device, model_config,
                                                    "metrics.aesthetic.clip_path", "metrics.aesthetic.clip_model",
                                                    CLIP_HELP, "MemBench's: ViT-L-14-quickgelu, OpenAI's ViT-L/14")
        width = self.head[0].in_features
        out = getattr(self.model.visual, "output_dim", width)
        if out != width:
            raise UserError(f"metrics.aesthetic.clip_model={clip_model!r} embeds images in {out} dimensions; the head "
                            f"{Path(path).name} reads {width} (ViT-L/14's 768)")
        self.model.eval()
        self.device = device
        self.name = f"aesthetic[{Path(path).name}, clip {clip_model}]"

    @torch.no_grad()
    def embed(self, pixels: Tensor) -> Tensor:
        """Scores ``(B,)`` of images already through :attr:`transform`."""
        features = self.model.encode_image(pixels.to(self.device)).float()
        return self.head(F.normalize(features, dim=-1)).squeeze(-1).cpu()

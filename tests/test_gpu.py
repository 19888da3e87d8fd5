"""The GPU path's settings, checked on the CPU: SDPA attention, the VAE's dtype, batch_size=auto, compile."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from memguard.components import Components, load_components
from memguard.errors import UserError
from memguard.gpu import largest_power_of_two, vae_dtype
from memguard.runner import run
from tests.test_run import config


def test_loaded_unet_attends_with_sdpa(tiny_model_dir: Path) -> None:
    processors = load_components(tiny_model_dir).unet.attn_processors
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values())


def test_vae_dtype_follows_diffusers_upcast_rule(tiny_components: Components) -> None:
    assert tiny_components.vae.config.force_upcast  # diffusers' default, as in SD 1.x / 2.x VAE configs
    assert vae_dtype(None, torch.float16, tiny_components) == torch.float32
    assert vae_dtype(None, torch.bfloat16, tiny_components) == torch.bfloat16
    assert vae_dtype(None, torch.float32, tiny_components) == torch.float32
    assert vae_dtype("float16", torch.float16, tiny_components) == torch.float16
    pixel_space = Components(tiny_components.unet, None, tiny_components.text_encoder, tiny_components.tokenizer,
                             tiny_components.scheduler)
    assert vae_dtype(None, torch.float16, pixel_space) is None


def test_largest_power_of_two_that_fits() -> None:
    tried = []

    def fits(n: int) -> bool:
        tried.append(n)
        return n <= 12

    assert largest_power_of_two(fits, 1024) == 8 and tried == [2, 4, 8, 16]
    assert largest_power_of_two(lambda n: True, 5) == 4
    assert largest_power_of_two(lambda n: False, 64) == 1


def test_batch_size_auto_on_cpu(tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="memguard.gpu"):
        metrics = run(config(tiny_model_dir, tmp_path, "batch_size=auto", "device=cpu"))
    assert metrics["generation"]["images_made"] == 4
    assert "batch_size=auto on cpu: 8 (no memory probe off CUDA)" in caplog.text


@pytest.mark.parametrize(("overrides", "message"), [
    (["batch_size=big"], "batch_size=big must be an integer >= 1 or auto"),
    (["vae_dtype=float64"], "vae_dtype='float64' is not one of null"),
    (["compile=maybe"], "compile='maybe' must be true or false"),
])
def test_bad_gpu_settings_name_the_key(tiny_model_dir: Path, tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        run(config(tiny_model_dir, tmp_path, *overrides))
    assert not (tmp_path / "config.yaml").exists()


def test_compile_without_a_compiler_is_one_line(tiny_model_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._inductor import cpp_builder, exc

    def missing() -> str:
        raise exc.InvalidCxxCompiler()

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", missing)
    with pytest.raises(UserError, match=r"compile=true on the CPU needs a C\+\+ compiler .*run without compile=true"):
        run(config(tiny_model_dir, tmp_path, "compile=true", "device=cpu"))
    assert not (tmp_path / "config.yaml").exists()

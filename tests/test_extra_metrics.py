"""The field's later metrics (metrics=paper_plus, +extra_metrics=...): the LAION aesthetic predictor with MemBench's
real head, LPIPS diversity among a prompt's images, DINOv2 similarity as a second copy score; each checked
against the reference computation, then end to end on a tiny run: metrics.json, report.html, `memguard tables`."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from memguard.check import check_inputs
from memguard.errors import UserError
from memguard.evaluate import evaluate
from memguard.metrics.aesthetic import AestheticScorer, load_head
from memguard.metrics.diversity import LpipsDistance
from memguard.metrics.dino import DinoEmbedder
from memguard.runner import run
from memguard.tables import write_tables
from tests.rehearsal import AESTHETIC_HEAD, extra_metric_overrides, write_extra_metric_weights
from tests.test_evaluate import make_references
from tests.test_run import config

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_extra_metric_weights(tmp_path_factory.mktemp("extra-weights"))


def test_the_aesthetic_head_is_membenchs_file_pinned_in_its_source() -> None:
    source = OmegaConf.load(CONF / "extra_metrics" / "aesthetic.yaml").sources.aesthetic
    data = AESTHETIC_HEAD.read_bytes()
    assert len(data) == 3714759 and hashlib.sha256(data).hexdigest() == source.sha256
    assert "f22a0fdcd24fa0f4a43bf7b9a8e42c8c78af302f" in source.url


def test_aesthetic_score_is_the_mlp_on_the_normalised_clip_embedding(weights: dict[str, Path]) -> None:
    import open_clip

    scorer = AestheticScorer(weights["aesthetic"], weights["aesthetic_clip"], "mg-tiny-clip-768",
                             model_config=weights["aesthetic_clip_config"])
    pixels = torch.rand(3, 3, 32, 32)
    clip = open_clip.create_model("mg-tiny-clip-768", pretrained=str(weights["aesthetic_clip"])).eval()
    state = torch.load(AESTHETIC_HEAD, map_location="cpu", weights_only=True)
    with torch.no_grad():
        x = F.normalize(clip.encode_image(pixels), dim=-1)
        for i in (0, 2, 4, 6, 7):  # MemBench's MLP: five linear layers, no activation, dropout off in eval
            x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    assert torch.allclose(scorer.embed(pixels), x[:, 0], atol=1e-5)
    assert scorer.embed(pixels).std() > 0  # the images differ: so do their scores


def test_aesthetic_files_that_are_not_the_head_are_refused(tmp_path: Path, weights: dict[str, Path]) -> None:
    with pytest.raises(UserError, match="is not a file; the aesthetic head"):
        load_head(tmp_path / "missing.pth")
    torch.save({"w": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="is not the aesthetic MLP"):
        load_head(tmp_path / "other.pth")
    with pytest.raises(UserError, match="embeds images in 16 dimensions"):  # a CLIP whose width the head cannot read
        from tests.rehearsal import write_metric_weights

        small = write_metric_weights(tmp_path / "small")
        AestheticScorer(weights["aesthetic"], small["clip"], "mg-tiny-clip", model_config=small["clip_config"])


def test_lpips_diversity_is_the_mean_over_pairs_of_torchmetrics_lpips(weights: dict[str, Path]) -> None:
    from torchmetrics.functional.image.lpips import _LPIPS

    network = LpipsDistance(weights["alexnet"])
    reference = _LPIPS(pretrained=True, net="alex", pnet_rand=True).eval()
    state = torch.load(weights["alexnet"], weights_only=True)
    for conv, s in zip((0, 3, 6, 8, 10), (1, 2, 3, 4, 5)):  # torchmetrics keeps each layer's torchvision index
        layer = getattr(getattr(reference.net, f"slice{s}"), str(conv))
        layer.weight.data, layer.bias.data = state[f"features.{conv}.weight"], state[f"features.{conv}.bias"]
    torch.manual_seed(1)
    images = [torch.rand(3, 64, 72) * 2 - 1 for _ in range(3)]
    with torch.no_grad():
        pairs = [float(reference(images[i][None], images[j][None])) for i, j in ((0, 1), (0, 2), (1, 2))]
    assert network.mean_pairwise(images) == pytest.approx(sum(pairs) / 3, rel=1e-5)
    assert network.mean_pairwise([images[0], images[0].clone()]) == pytest.approx(0, abs=1e-7)
    assert torch.isnan(torch.tensor(network.mean_pairwise(images[:1])))
    small = [torch.rand(3, 32, 32) * 2 - 1 for _ in range(2)]  # the tiny scenario's size: upsampled to 64 first
    up = [torch.nn.functional.interpolate(x[None], size=[64, 64], mode="bilinear", align_corners=False)[0] for x in small]
    with torch.no_grad():
        assert network.mean_pairwise(small) == pytest.approx(float(reference(up[0][None], up[1][None])), rel=1e-5)
    torch.save({"features.0.weight": torch.zeros(1)}, weights["alexnet"].with_name("bad.pth"))
    with pytest.raises(UserError, match="is not torchvision's AlexNet"):
        LpipsDistance(weights["alexnet"].with_name("bad.pth"))


def test_dino_embedding_is_the_normalised_cls_token(weights: dict[str, Path], tmp_path: Path) -> None:
    from transformers import Dinov2Model

    embedder = DinoEmbedder(weights["dino"])
    pixels = torch.randn(2, 3, 224, 224)
    model = Dinov2Model.from_pretrained(str(weights["dino"])).eval()
    with torch.no_grad():
        out = model(pixel_values=pixels)
        expected = F.normalize(out.last_hidden_state[:, 0], dim=1)  # the CLS token after the final layer norm
    assert torch.allclose(embedder.embed(pixels), expected, atol=1e-6)
    assert torch.allclose(embedder.embed(pixels).norm(dim=1), torch.ones(2))
    with pytest.raises(UserError, match="is not a model folder"):
        DinoEmbedder(tmp_path)


PROMPTS_FILE = [{"caption": "a red circle", "group": "memorized"}, {"caption": "a blue square", "group": "memorized"}]
CONTROLS = ["a green triangle", "a grey star"]  # control prompts: group unmemorized


@pytest.fixture(scope="module")
def evaluated(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, weights: dict[str, Path]) -> Path:
    """A tiny run (2 prompts and 2 control prompts, 3 images each) evaluated with metrics=pixel and the three extras."""
    root = tmp_path_factory.mktemp("extra")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS_FILE))
    (root / "controls.txt").write_text("\n".join(CONTROLS) + "\n")
    run_dir = root / "outputs" / "runs" / "tiny" / "none"
    base = [f"prompts_file={prompts}", "prompts=null", "images_per_prompt=3", f"control_prompts_file={root / 'controls.txt'}"]
    run(config(tiny_model_dir, run_dir, *base))
    make_references(run_dir, root / "refs")
    overrides = [*base, "metrics=pixel", f"references={root / 'refs'}", f"paths.cache_dir={root / 'cache'}",
                 *extra_metric_overrides(weights)]
    assert not check_inputs(config(tiny_model_dir, run_dir, *overrides)).problems
    evaluate(config(tiny_model_dir, run_dir, *overrides))
    return run_dir


def test_metrics_json_has_each_extra_metric_per_group_with_intervals(evaluated: Path) -> None:
    metrics = json.loads((evaluated / "metrics.json").read_text())
    gens = pd.read_csv(evaluated / "generations.csv")
    assert metrics["aesthetic"]["scorer"].startswith("aesthetic[sac+logos+ava1-l14-linearMSE.pth")
    assert metrics["aesthetic"]["mean"] == pytest.approx(gens.aesthetic.mean())
    assert metrics["diversity"]["network"].startswith("lpips[alex")
    per_prompt = gens.groupby("prompt_idx").diversity.agg(["min", "max", "mean"])
    assert (per_prompt["min"] == per_prompt["max"]).all() and (per_prompt["mean"] > 0).all()
    assert metrics["diversity"]["mean"] == pytest.approx(per_prompt["mean"].mean()) and metrics["diversity"]["prompts"] == 4
    assert metrics["dino"]["embedder"].startswith("dino[dinov2-tiny") and not metrics["dino"]["threshold_calibrated"]
    copies = gens.set_index("file")
    assert copies.loc["images/00000_0.png", "dino_nearest_reference"] == "copy_a.png"  # an exact copy: its reference
    assert copies.loc["images/00000_0.png", "dino_similarity"] == pytest.approx(1.0, abs=1e-5)
    for section, key in (("aesthetic", "mean"), ("diversity", "mean"), ("dino", "p95"), ("dino", "copy_fraction")):
        entry = metrics[section]
        assert entry[f"{key}_lo"] <= entry[key] <= entry[f"{key}_hi"], (section, key)
        assert set(entry["groups"]) == {"memorized", "unmemorized"}
        for group in entry["groups"].values():
            assert group[f"{key}_lo"] <= group[key] <= group[f"{key}_hi"], (section, key)
    assert metrics["cost"]["control"]["unmemorized"]["aesthetic"] == metrics["aesthetic"]["groups"]["unmemorized"]["mean"]


def test_report_and_tables_show_the_extra_metrics_per_group(evaluated: Path) -> None:
    page = (evaluated / "report.html").read_text()
    for column in ("aesthetic", "LPIPS diversity", "DINO copy fraction", "aesthetic by aesthetic[", "dino by dino["):
        assert column in page, column
    write_tables(evaluated.parents[2])
    table = pd.read_csv(evaluated.parents[2] / "tables" / "tiny.csv")
    assert list(table.Captions) == ["memorized", "unmemorized"]
    for column in ("Aesthetic", "LPIPS diversity", "DINO copy fraction", "DINO similarity (95pc)"):
        assert table[column].notna().all() and (table[f"{column}_lo"] <= table[column]).all(), column
    shown = (evaluated.parents[2] / "tables" / "tiny.md").read_text()
    assert "| Aesthetic |" in shown.replace("Aesthetic | LPIPS", "Aesthetic |") and "LPIPS diversity" in shown


@pytest.mark.parametrize("dino_threshold", [-1.0, 2.0])  # DINO calls every image a copy; none
def test_report_shows_the_images_the_copy_detectors_disagree_on(evaluated: Path, tmp_path: Path,
                                                                tiny_model_dir: Path, weights: dict[str, Path],
                                                                dino_threshold: float) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(evaluated, run_dir)
    root = evaluated.parents[3]
    overrides = [f"prompts_file={root / 'prompts.jsonl'}", "prompts=null", "images_per_prompt=3",
                 f"control_prompts_file={root / 'controls.txt'}", "metrics=pixel", f"references={root / 'refs'}",
                 f"paths.cache_dir={root / 'cache'}", *extra_metric_overrides(weights),
                 f"metrics.dino.threshold={dino_threshold}"]
    metrics = evaluate(config(tiny_model_dir, run_dir, *overrides))
    gens = pd.read_csv(run_dir / "generations.csv")
    sscd_copy = gens.similarity > metrics["similarity"]["threshold"]
    assert 0 < sscd_copy.sum() < len(gens)  # the exact copies and not the rest: the two verdicts can differ
    disagree = gens[~sscd_copy] if dino_threshold < 0 else gens[sscd_copy]
    section = metrics["agreement"]
    assert section["images"] == len(gens) and section["kappa"] == pytest.approx(0, abs=1e-9)  # one detector constant: no agreement beyond chance
    assert section["similarity_by"].startswith("pixel(") and section["dino_by"].startswith("dino[")
    assert (section["dino_only"], section["similarity_only"]) == ((len(disagree), 0) if dino_threshold < 0 else (0, len(disagree)))
    page = (run_dir / "report.html").read_text()
    table = page.split("<h2 id='agreement'>")[1].split("<h2>")[0]
    assert sorted(set(re.findall(r"src='(images/[^']+)'", table))) == sorted(disagree.file)
    assert ("DINO: copy" if dino_threshold < 0 else "similarity: copy") in table
    assert (run_dir / "agreement.png").is_file() and "src='agreement.png'" in page


def test_check_names_each_missing_extra_weight_and_where_fetch_gets_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "weights" / "dinov2-base").mkdir(parents=True)
    (tmp_path / "weights" / "dinov2-base" / "config.json").write_text("{}")
    (tmp_path / "weights" / "dinov2-base" / "model.safetensors").write_bytes(b"not safetensors")
    cfg = config(tiny_model_dir, tmp_path / "run", "metrics=paper_plus", f"paths.weights_dir={tmp_path / 'weights'}",
                 f"references={tmp_path}")
    problems = "\n".join(check_inputs(cfg).problems)
    for key, what in (("metrics.aesthetic.path", "is not a file"), ("metrics.aesthetic.clip_path", "is not a file"),
                      ("metrics.diversity.path", "is not a file"), ("metrics.dino.path", "cannot be opened")):
        line = next((p for p in problems.splitlines() if f"{key}=" in p), "")
        assert what in line and "memguard fetch" in line, (key, line)


@pytest.mark.slow
def test_fetch_gets_every_extra_weight_from_its_source(tmp_path: Path, weights: dict[str, Path],
                                                      tiny_model_dir: Path) -> None:
    """metrics=paper_plus's four sources served on 127.0.0.1: MemBench's real head under its pinned sha256, the
    AlexNet file under a sha256 prefix, the CLIP file and the DINOv2 folder from a fake hub; then check passes."""
    from tests.fetch_servers import hub_routes, serve, static
    from tests.test_fetch import mg

    clip_repo = tmp_path / "clip-repo"
    clip_repo.mkdir()
    shutil.copy(weights["aesthetic_clip"], clip_repo / "open_clip_pytorch_model.bin")
    alexnet = weights["alexnet"].read_bytes()
    routes = [*hub_routes("test/clip-l14", clip_repo), *hub_routes("test/dinov2", weights["dino"]),
              ("/files/aesthetic.pth", static(AESTHETIC_HEAD.read_bytes())), ("/files/alexnet.pth", static(alexnet))]
    with serve(routes) as server:
        overrides = ["scenario=custom", "prompts=[a red circle]", f"model.path={tiny_model_dir}", "metrics=paper_plus",
                     f"paths.weights_dir={tmp_path / 'weights'}", f"references={tmp_path}",
                     "sources.similarity=null", "sources.alignment=null", "sources.fid=null",
                     f"sources.aesthetic.url={server.url}/files/aesthetic.pth", "sources.aesthetic_clip.repo=test/clip-l14",
                     f"sources.diversity.url={server.url}/files/alexnet.pth",
                     f"sources.diversity.sha256_prefix={hashlib.sha256(alexnet).hexdigest()[:8]}",
                     "sources.dino.repo=test/dinov2", "fetch.timeout=5", "fetch.retries=1"]
        result = mg("fetch", *overrides, cwd=tmp_path, env={"HF_ENDPOINT": server.url})
        assert result.returncode == 0, result.stdout + result.stderr
    got = tmp_path / "weights"
    assert (got / "sac+logos+ava1-l14-linearMSE.pth").read_bytes() == AESTHETIC_HEAD.read_bytes()
    assert (got / "ViT-L-14-openai.bin").read_bytes() == weights["aesthetic_clip"].read_bytes()
    assert (got / "alexnet-owt-7be5be79.pth").read_bytes() == alexnet
    assert (got / "dinov2-base" / "config.json").is_file() and (got / "dinov2-base" / "model.safetensors").is_file()
    cfg = config(tiny_model_dir, tmp_path / "run", "metrics=paper_plus", f"paths.weights_dir={got}",
                 f"references={tmp_path}")
    problems = check_inputs(cfg).problems
    assert not [p for p in problems if any(k in p for k in ("aesthetic", "diversity", "dino"))], problems


@pytest.mark.parametrize("calibrated", [False, True])
def test_an_uncalibrated_dino_threshold_is_warned_in_one_line(calibrated: bool, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    import memguard.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "nearest_stage", lambda *args: {"dino": {}})
    cfg = OmegaConf.create({"metrics": {"dino": {"threshold": 0.42, "calibrated": calibrated}}})
    with caplog.at_level("WARNING", logger=evaluate_module.log.name):
        out = evaluate_module.dino_stage(cfg, Path("."), pd.DataFrame(), [])
    warned = [r.getMessage() for r in caplog.records if "metrics.dino.threshold=0.42" in r.getMessage()]
    assert out["dino"]["threshold_calibrated"] is calibrated and len(warned) == (0 if calibrated else 1)

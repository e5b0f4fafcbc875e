"""The backbone interface on diffusers DiT and PixArt: folders, adapters, gates, pruning,
recovery and export, against the unwrapped models and stock `from_pretrained`."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import leandit
from leandit.backbones import ClassLabels, TextEmbeddings, backbone, cond_slice
from leandit.compress.depth import DepthGates, GatedModel, LearnablePruningJob, LearnableSettings, parse_scheme
from leandit.compress.depth import export_pruned, make_calibration_set, score_method
from leandit.compress.depth.baselines import shortgpt_scores
from leandit.compress.depth.lora import lora_targets
from leandit.compress.recovery import RecoveryJob, RecoverySettings
from leandit.data import digits_dataset
from leandit.models.blocks import running_blocks
from leandit.models.infer import CheckpointError
from leandit.models.wrappers import WRAPPERS, WrapperType, register_wrapper
from leandit.train import LoopConfig, Trainer

from conftest import run_cli, tiny_model
from diffusers_models import CaptionedDigits, tiny_diffusers_dit, tiny_pixart


def _inputs(model, n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    spec = backbone(model).spec
    x = torch.randn(n, *spec.input_shape, generator=gen)
    t = torch.randint(0, 1000, (n,), generator=gen)
    if spec.conditioning.kind == "class":
        cond = torch.randint(0, spec.conditioning.num_classes, (n,), generator=gen)
    else:
        data = CaptionedDigits()
        cond = {"text": data.embeddings[:n], "text_mask": data.masks[:n]}
    return x, t, cond


FAMILIES = {"dit": tiny_diffusers_dit, "pixart": tiny_pixart}


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


def test_adapters_describe_both_families():
    dit, pixart = tiny_diffusers_dit(), tiny_pixart()
    a, b = backbone(dit).spec, backbone(pixart).spec
    assert (a.family, a.depth, a.hidden_size, a.num_heads, a.learn_sigma, a.input_shape) == ("diffusers DiT", 4, 16, 2, True, (1, 8, 8))
    assert a.conditioning == ClassLabels(10, 10) and a.space == "pixel"
    assert b.family == "PixArt" and isinstance(b.conditioning, TextEmbeddings) and b.conditioning.dim == 16
    assert backbone(dit).blocks is dit.transformer_blocks and backbone(pixart).blocks is pixart.transformer_blocks


def test_predict_is_the_models_own_output(family):
    model = FAMILIES[family]().eval()
    x, t, cond = _inputs(model)
    with torch.no_grad():
        out = backbone(model).predict(x, t, cond)
        if family == "dit":
            direct = model(hidden_states=x, timestep=t, class_labels=cond).sample
        else:
            direct = model(x, encoder_hidden_states=cond["text"], encoder_attention_mask=cond["text_mask"], timestep=t,
                           added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    assert out.shape == (3, 2, 8, 8) and torch.equal(out, direct)


def test_open_gates_equal_the_unwrapped_model_and_closed_gates_remove_blocks(family):
    model = FAMILIES[family]().eval()
    x, t, cond = _inputs(model)
    adapter = backbone(model)
    with torch.no_grad():
        plain = adapter.predict(x, t, cond)
        gated = GatedModel(model, DepthGates(parse_scheme("1:2", 4)))
        opened = adapter.predict(x, t, cond, via=gated, gate_masks=torch.ones(4))
        closed = adapter.predict(x, t, cond, via=gated, gate_masks=torch.tensor([1.0, 0.0, 0.0, 1.0]))
        gated.remove_hooks()
        with running_blocks(model, [0, 3]):
            shallow = adapter.predict(x, t, cond)
    assert torch.allclose(opened, plain, atol=1e-6)
    assert torch.allclose(closed, shallow, atol=1e-6) and not torch.allclose(closed, plain, atol=1e-3)


def test_lora_skips_the_per_block_embedder_copies():
    targets = lora_targets(tiny_diffusers_dit(depth=2))
    assert "transformer_blocks.0.attn1.to_q" in targets and "transformer_blocks.1.ff.net.2" in targets
    assert not any(".norm1.emb." in t for t in targets)
    assert "transformer_blocks.0.norm1.linear" in targets  # the block's own adaLN


def test_diffusers_folder_round_trip_keeps_weights_ema_history_and_stock_loading(tmp_path):
    from diffusers import DiTTransformer2DModel

    model, ema = tiny_diffusers_dit(seed=0), tiny_diffusers_dit(seed=1)
    model.compression = [{"method": "test"}]
    folder = leandit.save_model(model, tmp_path / "m", ema=ema, extra={"trained_steps": 5})
    assert {p.name for p in folder.iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors", "leandit.json",
                                                  "ema.safetensors", "compression.json"}
    stock = DiTTransformer2DModel.from_pretrained(folder)
    assert all(torch.equal(a, b) for a, b in zip(stock.state_dict().values(), model.state_dict().values()))
    loaded = leandit.load_model(folder)  # EMA by default
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ema.state_dict().values()))
    assert loaded.compression == [{"method": "test"}] and backbone(loaded).spec.space == "pixel"
    raw = leandit.load_model(folder, weights="model")
    assert all(torch.equal(a, b) for a, b in zip(raw.state_dict().values(), model.state_dict().values()))
    assert json.loads((folder / "leandit.json").read_text())["info"] == {"trained_steps": 5}


def test_plain_diffusers_and_pipeline_folders_load_offline(tmp_path):
    model = tiny_pixart()
    model.save_pretrained(tmp_path / "pipe" / "transformer")  # stock diffusers files only, no leandit.json
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline",
                                                                    "transformer": ["diffusers", "PixArtTransformer2DModel"]}))
    for path in (tmp_path / "pipe", tmp_path / "pipe" / "transformer"):
        loaded = leandit.load_model(path)
        assert type(loaded).__name__ == "PixArtTransformer2DModel"
        assert backbone(loaded).spec.space == "latent"  # leandit's default without leandit.json
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_bad_folders_are_one_line_errors(tmp_path):
    from diffusers import AutoencoderKL

    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="pipeline without a transformer"):
        leandit.load_model(tmp_path / "pipe")
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=2).save_pretrained(tmp_path / "vae")
    with pytest.raises(CheckpointError, match="AutoencoderKL, not a transformer leandit can adapt"):
        leandit.load_model(tmp_path / "vae")
    folder = leandit.save_model(tiny_model(), tmp_path / "dit")
    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**meta, "model_type": "unet"}))
    with pytest.raises(CheckpointError, match="unknown model_type 'unet'"):
        leandit.load_model(folder)
    tiny_diffusers_dit().save_pretrained(tmp_path / "half")
    (tmp_path / "half" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors is missing"):
        leandit.load_model(tmp_path / "half")
    with pytest.raises(ValueError, match="not a backbone"):
        leandit.save_model(nn.Linear(2, 2), tmp_path / "linear")
    assert not (tmp_path / "linear").exists()


def test_old_leandit_folders_still_load(tmp_path):
    """A folder as leandit wrote it before the backbone interface (format 1, no leandit.json)."""
    model = tiny_model()
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"format": "leandit-model", "format_version": 1, "model_type": "dit",
                                                     "config": model.config.to_dict()}))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    loaded = leandit.load_model(folder)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert leandit.load_model("digits-teacher").config.depth == 12  # the shipped teacher by name


class Scaled(nn.Module):
    """A stand-in for a method's wrapper: a learned output scale and a table."""

    def __init__(self, backbone_model: nn.Module, note: str = ""):
        super().__init__()
        self.backbone = backbone_model
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.note = note

    def forward(self, *args, **kwargs):
        return self.backbone(*args, **kwargs) * self.scale


def test_wrappers_save_their_weights_and_tables_beside_any_backbone(tmp_path):
    register_wrapper(WrapperType("test-scaled", Scaled, inner=lambda w: w.backbone,
                                 state=lambda w: ({"scale": w.scale.detach()}, {"note": w.note}),
                                 build=lambda inner, tensors, table: _rebuilt(inner, tensors, table)))
    try:
        wrapped = Scaled(tiny_model(), note="hello")
        with torch.no_grad():
            wrapped.scale.fill_(3.0)
        folder = leandit.save_model(wrapped, tmp_path / "w", ema=wrapped)
        loaded = leandit.load_model(folder)
        assert isinstance(loaded, Scaled) and float(loaded.scale.detach()) == 3.0 and loaded.note == "hello"
        x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([3, 4])
        assert torch.equal(loaded(x, t, y), wrapped(x, t, y))
    finally:
        WRAPPERS.pop("test-scaled")
    with pytest.raises(CheckpointError, match="wrapped by 'test-scaled', which this leandit does not know"):
        leandit.load_model(folder)


def _rebuilt(inner, tensors, table):
    wrapper = Scaled(inner, table["note"])
    with torch.no_grad():
        wrapper.scale.copy_(tensors["scale"])
    return wrapper


def test_shortgpt_and_learnable_pruning_export_diffusers_models_that_stock_loading_reads(tmp_path, family):
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    stock_class = DiTTransformer2DModel if family == "dit" else PixArtTransformer2DModel
    data = digits_dataset() if family == "dit" else CaptionedDigits()
    model = FAMILIES[family]()
    calibration = make_calibration_set(model, data, size=16)
    decision = score_method("shortgpt", model, calibration, parse_scheme("1:2", 4), batch_size=8, progress=False)
    assert len(shortgpt_scores(model, calibration, 8)) == 4
    folder = export_pruned(model, decision, tmp_path / "shortgpt")
    stock = stock_class.from_pretrained(folder)
    assert stock.config.num_layers == 2 and len(stock.transformer_blocks) == 2
    x, t, cond = _inputs(model)
    with torch.no_grad(), running_blocks(model, decision.kept):
        expected = backbone(model).predict(x, t, cond)
    with torch.no_grad():
        assert torch.allclose(backbone(stock).predict(x, t, cond), expected, atol=1e-6)

    conditioning = backbone(model).spec.conditioning
    if family == "pixart":
        conditioning = conditioning.with_null(data.null_condition)
    job = LearnablePruningJob(FAMILIES[family](), LearnableSettings(scheme="1:2", lora_rank=2), conditioning=conditioning)
    config = LoopConfig(steps=3, global_batch_size=8, ema_decay=0.9, log_every=1, precision="fp32", checkpoint_every=3)
    result = Trainer(config, tmp_path / "learn", device="cpu", progress=False).fit(job, data)
    learned = job.decision(result.ema, result.steps)
    exported = export_pruned(model, learned, tmp_path / "learned")
    assert len(stock_class.from_pretrained(exported).transformer_blocks) == 2
    assert leandit.load_model(exported).compression[-1]["kept_indices"] == learned.kept


def test_masked_kd_recovers_a_pruned_diffusers_dit_from_its_teacher(tmp_path):
    teacher = tiny_diffusers_dit()
    decision = score_method("shortgpt", teacher, make_calibration_set(teacher, digits_dataset(), size=16),
                            parse_scheme("1:2", 4), batch_size=8, progress=False)
    student = leandit.load_model(export_pruned(teacher, decision, tmp_path / "student"))
    from leandit.compress.recovery import teacher_layers

    layers = teacher_layers(student.compression, [], 2, 4)
    job = RecoveryJob(student, teacher, RecoverySettings(), layers)
    config = LoopConfig(steps=3, global_batch_size=8, ema_decay=None, log_every=1, precision="fp32", checkpoint_every=3)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    Trainer(config, tmp_path / "run", device="cpu", progress=False).fit(job, digits_dataset())
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert all(not p.requires_grad for p in teacher.parameters())
    assert layers == [decision.kept[0] if decision.kept[0] == 1 else 1, 3]


def test_a_text_model_without_an_empty_prompt_refuses_label_dropout_and_guidance():
    from leandit.evaluate.sampling import generate

    model = tiny_pixart()
    with pytest.raises(ValueError, match="empty prompt"):
        LearnablePruningJob(model, LearnableSettings(scheme="1:2"))
    data = CaptionedDigits()
    cond = {"text": data.embeddings[:2], "text_mask": data.masks[:2]}
    with pytest.raises(ValueError, match="unconditional input"):
        generate(model, cond, steps=2, cfg_scale=2.0, progress=False)
    conditioning = backbone(model).spec.conditioning.with_null(data.null_condition)
    images = generate(model, cond, steps=2, cfg_scale=2.0, progress=False, conditioning=conditioning)
    alone = generate(model, cond_slice(cond, slice(1, 2)), steps=2, cfg_scale=2.0, progress=False, conditioning=conditioning,
                     indices=[1])
    assert images.shape == (2, 1, 8, 8) and torch.allclose(images[1:], alone, atol=1e-5)


def test_cli_prunes_and_describes_a_diffusers_folder(tmp_path):
    folder = leandit.save_model(tiny_diffusers_dit(), tmp_path / "dit")
    done = run_cli("prune", str(folder), "--method", "shortgpt", "--keep", "2", "--calibration-size", "16",
                   "--out", str(tmp_path / "pruned"), "--quiet")
    assert done.returncode == 0, done.stderr
    info = run_cli("info", str(tmp_path / "pruned" / "model"))
    assert info.returncode == 0, info.stderr
    assert "diffusers DiT, 2 blocks" in info.stdout and "kept 2 of 4 blocks" in info.stdout
    bad = run_cli("prune", str(folder), "--method", "learnable", "--scheme", "1:3", "--steps", "1", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad" / "model").exists()


def _tiny_dit_pipeline(folder):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    # DiTPipeline guides with the null class 1000: the tiny model needs ImageNet's 1000 classes.
    transformer = tiny_diffusers_dit(in_channels=4, out_channels=8, num_embeds_ada_norm=1000)
    transformer.leandit_info = {"objective": "diffusion", "space": "latent"}
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)
    DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler()).save_pretrained(folder)
    return transformer


def test_export_pipeline_writes_a_pipeline_that_generates_with_the_pruned_transformer(tmp_path):
    from diffusers import DiffusionPipeline

    transformer = _tiny_dit_pipeline(tmp_path / "base")
    done = run_cli("prune", str(tmp_path / "base"), "--method", "indices", "--indices", "0,3", "--out", str(tmp_path / "pruned"))
    assert done.returncode == 0, done.stderr
    done = run_cli("export-pipeline", str(tmp_path / "base"), str(tmp_path / "pruned" / "model"), "--out", str(tmp_path / "pipe"))
    assert done.returncode == 0, done.stderr
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.transformer.config.num_layers == 2 and len(pipe.transformer.transformer_blocks) == 2
    assert json.loads((tmp_path / "pipe" / "transformer" / "compression.json").read_text())[-1]["kept_indices"] == [0, 3]
    images = pipe(class_labels=[1, 2], num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 8, 8, 3)
    with torch.no_grad():
        x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), torch.tensor([1, 2])
        with running_blocks(transformer, [0, 3]):
            expected = backbone(transformer).predict(x, t, y)
        assert torch.allclose(backbone(pipe.transformer).predict(x, t, y), expected, atol=1e-6)
    again = run_cli("export-pipeline", str(tmp_path / "base"), str(tmp_path / "pruned" / "model"), "--out", str(tmp_path / "pipe"))
    assert again.returncode == 2 and "exists" in again.stderr
    wrong = run_cli("export-pipeline", str(tmp_path / "pruned"), str(tmp_path / "pruned" / "model"), "--out", str(tmp_path / "p2"))
    assert wrong.returncode == 2 and "not a diffusers pipeline folder" in wrong.stderr and not (tmp_path / "p2").exists()


def test_pixart_pipeline_end_to_end_captions_prune_recover_sample_export(tmp_path):
    """A tiny PixArt pipeline through every command a user runs on it, in process."""
    import numpy as np
    from diffusers import PixArtAlphaPipeline
    from PIL import Image

    from leandit.cli import main
    from tiny_pipeline import build_tiny_pipeline

    pipe = build_tiny_pipeline(tmp_path / "pipe", num_layers=4)
    for c, name in enumerate(("red_cat", "blue_dog")):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((16, 16, 3), 60 * c + 10 * i, dtype=np.uint8)).save(tmp_path / "images" / name / f"{i}.png")
    common = ["--quiet"]
    assert main(["extract-features", str(tmp_path / "images"), "--pipeline", str(pipe), "--captions", "class-names",
                 "--resolution", "16", "--out", str(tmp_path / "latents"), *common]) == 0
    data = ["--data", str(tmp_path / "latents"), "--batch-size", "4"]
    assert main(["prune", str(pipe), "--method", "learnable", "--scheme", "1:2", "--steps", "2", "--lora-rank", "2",
                 "--out", str(tmp_path / "pruned"), *data, *common]) == 0
    assert main(["finetune", str(tmp_path / "pruned" / "model"), "--teacher", str(pipe), "--steps", "2",
                 "--out", str(tmp_path / "recovered"), *data, *common]) == 0
    recovered = leandit.load_model(tmp_path / "recovered" / "model")
    assert len(recovered.transformer_blocks) == 2 and recovered.compression[-1]["method"] == "recovery"
    assert main(["encode-prompts", "--pipeline", str(pipe), "--prompts", "red cat", "blue dog",
                 "--out", str(tmp_path / "prompts.safetensors")]) == 0
    assert main(["sample", str(tmp_path / "recovered" / "model"), "--prompts", str(tmp_path / "prompts.safetensors"),
                 "--vae", str(pipe / "vae"), "--num-samples", "4", "--steps", "2", "--cfg-scale", "2",
                 "--out", str(tmp_path / "samples"), *common]) == 0
    with np.load(tmp_path / "samples" / "samples.npz") as samples:
        assert samples["arr_0"].shape == (4, 16, 16, 3) and samples["arr_1"].tolist() == [0, 1, 0, 1]
    assert main(["sample", str(pipe), "--num-samples", "2", "--out", str(tmp_path / "no-prompts")]) == 2  # one-line error
    assert main(["export-pipeline", str(pipe), str(tmp_path / "recovered" / "model"), "--out", str(tmp_path / "exported")]) == 0
    exported = PixArtAlphaPipeline.from_pretrained(tmp_path / "exported")
    assert len(exported.transformer.transformer_blocks) == 2
    images = exported("a red cat", height=16, width=16, num_inference_steps=2, use_resolution_binning=False,
                      output_type="np").images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()


def test_bench_and_flops_count_both_families_and_their_guided_batch():
    from leandit.evaluate.speed import measure_speed
    from leandit.models.flops import forward_flops

    for make in (tiny_diffusers_dit, tiny_pixart):
        deep, shallow = make(depth=4), make(depth=2)
        results = measure_speed([("deep", deep), ("shallow", shallow)], 2, cfg_scale=1.5, sampling_steps=10, warmup=1, rounds=2)
        assert [r.depth for r in results] == [4, 2]
        assert results[0].flops_per_step == forward_flops(deep, 4)  # guidance runs 2 x batch
        assert forward_flops(deep, 1) > forward_flops(shallow, 1) > 0


def test_calibration_analysis_runs_on_a_diffusers_folder(tmp_path):
    from leandit.cli import main

    folder = leandit.save_model(tiny_diffusers_dit(), tmp_path / "dit")
    assert main(["analyze", "calibration", str(folder), "--keep", "2", "--samples", "4", "--calibration-size", "16",
                 "--out", str(tmp_path / "analysis"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "analysis" / "summary.json").read_text())
    assert summary["samples"] == 4 and summary["random"]["min"] <= summary["random"]["median"] <= summary["random"]["max"]
    assert set(summary["marks"]) == {"shortgpt", "fluxlite", "sensitivity", "oracle"}


def test_block_index_settings_are_reindexed_after_pruning():
    from leandit.commands.export_pipeline import reindex_config

    model = tiny_diffusers_dit()
    model.register_to_config(dual_attention_layers=[0, 2])
    assert reindex_config(model, [0, 2, 3]) == {"dual_attention_layers": [0, 1]}
    assert list(model.config.dual_attention_layers) == [0, 1]
    with pytest.raises(ValueError, match="does not say which blocks were kept"):
        reindex_config(model, None)


def test_sample_and_info_run_on_both_families(tmp_path):
    import numpy as np

    from leandit.cli import main

    folder = leandit.save_model(tiny_diffusers_dit(), tmp_path / "dit")
    assert main(["sample", str(folder), "--num-samples", "4", "--steps", "2", "--cfg-scale", "2", "--out", str(tmp_path / "s"),
                 "--quiet"]) == 0
    with np.load(tmp_path / "s" / "samples.npz") as samples:
        assert samples["arr_0"].shape == (4, 8, 8, 1) and samples["arr_1"].tolist() == [0, 1, 2, 3]
    pixart = leandit.save_model(tiny_pixart(), tmp_path / "pixart")
    done = run_cli("info", str(pixart), "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["family"] == "PixArt" and info["backbone"]["conditioning"] == {"kind": "text", "dim": 16}
    assert info["architecture"]["_class_name"] == "PixArtTransformer2DModel" and info["flops_per_forward"] > 0


def test_sharded_diffusers_weights_load(tmp_path):
    model = tiny_pixart()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").exists()
    loaded = leandit.load_model(tmp_path / "sharded")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_removing_block_0_of_a_diffusers_dit_records_which_embedder_copy_the_head_reads(tmp_path):
    from leandit.compress.depth.baselines import explicit

    model = tiny_diffusers_dit()
    same = export_pruned(model, explicit([1, 3], 4), tmp_path / "same")
    assert "notes" not in leandit.load_model(same).compression[-1]  # equal copies: nothing changes
    with torch.no_grad():
        model.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.bias.add_(0.5)
    moved = export_pruned(model, explicit([1, 3], 4), tmp_path / "moved")
    notes = leandit.load_model(moved).compression[-1]["notes"]
    assert len(notes) == 1 and "reads block 1's copy of norm1.emb" in notes[0] and "0.5" in notes[0]

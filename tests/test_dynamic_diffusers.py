"""DyDiT on diffusers' DiT and PixArt transformers (BasicTransformerBlock, ada_norm_zero and
ada_norm_single): exactness with everything on, sliced inference against masked training
with mixed widths and tokens, router gradients, MACs against an independent count, the
model folder and `leandit dynamic` on a diffusers folder."""

from __future__ import annotations

import json

import pytest
import torch

import leandit
from diffusers_models import tiny_diffusers_dit, tiny_pixart
from leandit.backbones import backbone
from leandit.compress.dynamic import DynamicModel, DynamicSettings
from leandit.compress.dynamic.diffusers_blocks import DiffusersDynamicBlock

FAMILIES = ("dit", "pixart")
TEXT_LENGTH = 120  # the adapter's example prompt length, which the dense MAC count assumes


def _model(family: str, seed: int = 0):
    """4 blocks of 4 heads (3 routed heads and groups per block)."""
    build = tiny_diffusers_dit if family == "dit" else tiny_pixart
    return build(depth=4, seed=seed, num_attention_heads=4, attention_head_dim=4)


def _inputs(family: str, n: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=gen)
    t = torch.tensor([999, 700, 300, 5][:n] + [500] * max(0, n - 4))
    if family == "dit":
        return x, t, torch.randint(0, 10, (n,), generator=gen)
    mask = torch.zeros(n, TEXT_LENGTH, dtype=torch.long)
    for i in range(n):
        mask[i, : 3 + 5 * i] = 1
    return x, t, {"text": torch.randn(n, TEXT_LENGTH, 16, generator=gen), "text_mask": mask}


def _scramble_routers_(model: DynamicModel, seed: int = 1) -> None:
    """Routers that decide differently per timestep and per token (about half of everything off)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.dynamic_blocks:
            for layer in (block.width_routers.heads, block.width_routers.groups):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 2)
                layer.bias.zero_()
            for p in block.token_router.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
            block.token_router.net[2].bias.zero_()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_head_group_and_token_on_equals_the_plain_model(family):
    model = _model(family)
    x, t, cond = _inputs(family)
    dense = backbone(model).predict(x, t, cond)
    dynamic = DynamicModel(model)
    assert all(isinstance(b, DiffusersDynamicBlock) for b in dynamic.dynamic_blocks)
    dynamic.train()
    assert torch.equal(backbone(dynamic).predict(x, t, cond), dense)  # masked path: bit-identical
    model.enable_gradient_checkpointing()  # diffusers then calls the blocks positionally
    assert torch.equal(backbone(dynamic).predict(x, t, cond), dense)
    model.disable_gradient_checkpointing()
    dynamic.eval()
    assert torch.allclose(backbone(dynamic).predict(x, t, cond), dense, atol=1e-6, rtol=0)  # sliced path
    assert torch.equal(backbone(dynamic).predict(x, t, cond, dense=True), dense)
    assert dynamic.last_macs.shape == (4,) and torch.all(dynamic.macs.ratio(dynamic.last_macs) > 1)  # routers cost a little
    assert set(dynamic.state_dict()) >= {f"backbone.{k}" for k in model.state_dict()}
    assert set(model.state_dict()) == set(_model(family).state_dict())  # the backbone holds no router


@pytest.mark.parametrize("family", FAMILIES)
def test_the_routers_read_the_models_own_timestep_embedding(family):
    model = _model(family)
    t = torch.tensor([0, 250, 999])
    emb = backbone(model).timestep_embedding(t)
    assert emb.shape == (3, 16)
    with torch.no_grad():
        if family == "dit":
            embedder = model.transformer_blocks[0].norm1.emb
            labels = torch.tensor([1, 2, 3])
            own = embedder(t, labels, hidden_dtype=torch.float32) - embedder.class_embedder(labels)
        else:
            own = model.adaln_single(t, {"resolution": None, "aspect_ratio": None}, batch_size=3, hidden_dtype=torch.float32)[1]
    assert torch.allclose(emb, own, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_sliced_inference_equals_masked_training_with_mixed_widths_and_tokens(family):
    dynamic = DynamicModel(_model(family))
    _scramble_routers_(dynamic)
    x, t, cond = _inputs(family)
    heads, groups = dynamic.width_decisions(t)
    assert len({tuple(r) for r in torch.cat([heads, groups], -1).flatten(1).tolist()}) > 1  # images differ in width
    assert 0 < heads.float().mean() < 1 and 0 < groups.float().mean() < 1
    dynamic.train()  # no router noise: the same decisions as inference, taken as masks
    with torch.no_grad():
        masked = backbone(dynamic).predict(x, t, cond)
    masked_macs = dynamic.last_macs.clone()
    masked_kept = torch.stack([b.kept_tokens for b in dynamic.dynamic_blocks], 1)
    dynamic.eval()
    sliced = backbone(dynamic).predict(x, t, cond)
    kept = torch.stack([b.kept_tokens for b in dynamic.dynamic_blocks], 1)  # (N, L)
    assert 0 < kept.mean() < 1 and len(set(kept.flatten().tolist())) > 2  # images keep different counts
    assert torch.equal(kept, masked_kept)
    assert torch.allclose(sliced, masked, atol=1e-5, rtol=0)
    assert torch.equal(dynamic.last_macs, masked_macs)
    # One image alone computes what it computes in the mixed batch (its own pattern and tokens).
    one = backbone(dynamic).predict(x[1:2], t[1:2], cond[1:2] if family == "dit" else {k: v[1:2] for k, v in cond.items()})
    assert torch.allclose(one, sliced[1:2], atol=1e-5, rtol=0)
    assert not torch.allclose(sliced, backbone(dynamic).predict(x, t, cond, dense=True), atol=1e-3)


def test_pixarts_self_attention_mask_is_honoured_by_both_paths():
    model = _model("pixart").eval()
    x, t, cond = _inputs("pixart")
    image_mask = torch.ones(4, 16, dtype=torch.long)
    image_mask[:, 10:] = 0
    with torch.no_grad():
        dense = backbone(model).predict(x, t, cond, attention_mask=image_mask)
        dynamic = DynamicModel(model).eval()
        assert torch.allclose(backbone(dynamic).predict(x, t, cond, attention_mask=image_mask), dense, atol=1e-6, rtol=0)
        _scramble_routers_(dynamic)
        sliced = backbone(dynamic).predict(x, t, cond, attention_mask=image_mask)
        masked = backbone(dynamic.train()).predict(x, t, cond, attention_mask=image_mask)
    assert torch.allclose(sliced, masked, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_dynamic_training_step_reaches_every_router(family):
    from leandit.compress.dynamic.job import DynamicJob, DynamicTraining
    from leandit.compress.recovery import RecoverySettings
    from leandit.diffusion import StepRandom

    dynamic = DynamicModel(_model(family))
    x, _, cond = _inputs(family, n=8)
    plain = RecoverySettings(kd_weight=0.0, diffusion_weight=1.0, repkd_weight=0.0, class_dropout=0.0)
    job = DynamicJob(dynamic, DynamicTraining(target=0.8), plain)
    dynamic.train()

    def step() -> dict[str, torch.Tensor]:
        dynamic.zero_grad()
        loss, logs = job.compute_loss(dynamic, (x, cond), StepRandom(0, 0, 8, 0, 1, torch.device("cpu")))
        loss.backward()
        assert torch.isfinite(loss)
        return logs

    assert float(step()["macs_ratio"]) > 1  # the start: everything on
    for name, p in dynamic.dynamic_blocks.named_parameters():
        # At the start the token router's first layer gets nothing through its zero-initialised
        # output layer (nor does that layer's weight where the hidden unit's ReLU is silent).
        if "width_routers" in name or name.endswith("token_router.net.2.bias"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    weights = [p for n, p in dynamic.named_parameters() if n.startswith("backbone.") and p.grad is not None]
    assert weights and sum(float(p.grad.abs().sum()) for p in weights) > 0
    _scramble_routers_(dynamic)
    assert float(step()["macs_ratio"]) < 1
    for name, p in dynamic.dynamic_blocks.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("family", FAMILIES)
def test_mac_count_of_the_decisions_equals_an_independent_count(family):
    from torch.utils.flop_counter import FlopCounterMode

    from leandit.models.flops import _register_cpu_attention

    _register_cpu_attention()
    dynamic = DynamicModel(_model(family)).eval()
    _scramble_routers_(dynamic)
    x, t, cond = _inputs(family)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        backbone(dynamic).predict(x, t, cond)
    # The sliced path runs only the kept heads, groups and tokens, so torch's own count of the
    # forward (routers and the timestep embedding they read included) is what the decisions cost.
    assert counter.get_total_flops() == 2 * float(dynamic.last_macs.sum())
    assert float(dynamic.macs.ratio(dynamic.last_macs).mean()) < 0.9
    # Dense: the counter's fixed part (embedders, cross-attention at the example prompt length,
    # output head) plus full attention and feed-forward is the plain model's count.
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        backbone(dynamic.backbone).predict(x[:1], t[:1], cond[:1] if family == "dit" else {k: v[:1] for k, v in cond.items()})
    assert counter.get_total_flops() == 2 * dynamic.macs.dense_total


@pytest.mark.parametrize("family", FAMILIES)
def test_a_dynamic_diffusers_model_round_trips_through_its_folder(tmp_path, family):
    dynamic = DynamicModel(_model(family), DynamicSettings(tau=3.0))
    _scramble_routers_(dynamic)
    dynamic.eval()
    x, t, cond = _inputs(family)
    before = backbone(dynamic).predict(x, t, cond)
    folder = leandit.save_model(dynamic, tmp_path / "m")
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "diffusion_pytorch_model.safetensors", "leandit.json", "wrapper-0-dydit.safetensors"} <= names
    meta = json.loads((folder / "leandit.json").read_text())
    (record,) = meta["wrappers"]
    assert record["type"] == "dydit" and record["table"]["settings"]["tau"] == 3.0
    assert len(record["table"]["width_table"]["blocks"]) == 4  # one row per block
    loaded = leandit.load_model(folder)
    assert isinstance(loaded, DynamicModel) and loaded.settings == dynamic.settings
    assert all(isinstance(b, DiffusersDynamicBlock) for b in loaded.dynamic_blocks)
    assert all(torch.equal(v, dynamic.state_dict()[k]) for k, v in loaded.state_dict().items())
    loaded.eval()
    # Equal up to rounding only: the loaded weights lie unaligned in memory, which changes the
    # CPU kernels' summation order for the small per-pattern sub-batches.
    assert torch.allclose(backbone(loaded).predict(x, t, cond), before, atol=1e-5, rtol=0)
    assert loaded.width_table() == dynamic.width_table()
    # The backbone's files stay diffusers' own: stock loading reads the dense model.
    stock = type(dynamic.backbone).from_pretrained(str(folder))
    assert all(torch.equal(v, dynamic.backbone.state_dict()[k]) for k, v in stock.state_dict().items())


def test_leandit_dynamic_fine_tunes_a_diffusers_dit_folder(tmp_path):
    from leandit.cli import main

    folder = leandit.save_model(_model("dit"), tmp_path / "dit")
    assert main(["dynamic", str(folder), "--target", "0.9", "--out", str(tmp_path / "run"), "--steps", "2",
                 "--batch-size", "4", "--target-warmup", "0", "--reorder", "magnitude", "--quiet"]) == 0
    model = leandit.load_model(tmp_path / "run" / "model")
    assert isinstance(model, DynamicModel) and type(model.backbone).__name__ == "DiTTransformer2DModel"
    assert model.compression[-1]["method"] == "dydit" and model.compression[-1]["reordered"]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("macs_ratio" in m for m in metrics)
    x, t, y = _inputs("dit")
    model.eval()
    assert torch.isfinite(backbone(model).predict(x, t, y)).all()
    assert main(["info", str(tmp_path / "run" / "model")]) == 0


def test_a_dynamic_pixart_trains_on_captions_with_the_empty_prompt_and_saves(tmp_path):
    from diffusers_models import CaptionedDigits

    from leandit.commands.common import data_conditioning
    from leandit.compress.dynamic.job import DynamicJob, DynamicTraining
    from leandit.compress.recovery import RecoverySettings
    from leandit.train import LoopConfig, Trainer

    dynamic = DynamicModel(_model("pixart"))
    data = CaptionedDigits()
    plain = RecoverySettings(kd_weight=0.0, diffusion_weight=1.0, repkd_weight=0.0)  # label dropout 0.1
    job = DynamicJob(dynamic, DynamicTraining(target=0.9), plain, conditioning=data_conditioning(dynamic, data))
    before = {k: v.clone() for k, v in dynamic.dynamic_blocks.state_dict().items()}
    config = LoopConfig(steps=2, global_batch_size=4, ema_decay=None, log_every=1, precision="fp32", checkpoint_every=2)
    result = Trainer(config, tmp_path / "run", device="cpu", progress=False).fit(job, data)
    assert result.steps == 2
    assert any(not torch.equal(before[k], v) for k, v in dynamic.dynamic_blocks.state_dict().items())
    loaded = leandit.load_model(leandit.save_model(dynamic, tmp_path / "m"))
    assert isinstance(loaded, DynamicModel) and type(loaded.backbone).__name__ == "PixArtTransformer2DModel"


@pytest.mark.parametrize("family", FAMILIES)
def test_importance_reordering_of_diffusers_blocks_is_exact(family):
    from leandit.compress.dynamic.importance import reorder_by_importance

    model = _model(family).eval()
    x, t, cond = _inputs(family)
    with torch.no_grad():
        before = backbone(model).predict(x, t, cond)
        orders = reorder_by_importance(model)
        after = backbone(model).predict(x, t, cond)
    assert len(orders) == 4 and any(o["heads"] != [0, 1, 2, 3] for o in orders)
    assert torch.allclose(after, before, atol=1e-5, rtol=0)
    attn = model.transformer_blocks[0].attn1
    v = attn.to_v.weight.reshape(4, -1).norm(dim=1) * attn.to_out[0].weight.reshape(16, 4, 4).permute(1, 0, 2).flatten(1).norm(dim=1)
    assert torch.equal(v, v.sort(descending=True).values)  # head 0 (always on) is now the strongest


def test_blocks_it_does_not_compute_exactly_are_refused():
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import AttnProcessor

    plain = BasicTransformerBlock(16, 2, 8)  # layer_norm, GEGLU: neither DiT's nor PixArt's
    with pytest.raises(ValueError, match="norm_type"):
        DiffusersDynamicBlock(plain)
    model = _model("dit")
    model.transformer_blocks[0].attn1.set_processor(AttnProcessor())
    with pytest.raises(ValueError, match="AttnProcessor2_0"):
        DynamicModel(model)
    with pytest.raises(TypeError, match="BasicTransformerBlock"):
        DiffusersDynamicBlock(torch.nn.Linear(2, 2))

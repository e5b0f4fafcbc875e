"""Checkpoints load as the original DiT/SiT releases and training runs wrote them, round trip
through every supported format without changing a bit of the output, fail loudly with a
message that names the problem, and a model folder is never left half-written.
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib

import pytest
from pathlib import Path

import torch
from safetensors.torch import save_file

import dit_reference as ref
from leandit.models import (
    CheckpointError,
    DiTConfig,
    build_model,
    infer_dit_config,
    load_model,
    model_from_state_dict,
    named_config,
    save_model,
)
from leandit.models import io as model_io
from leandit.models.flops import count_parameters

# ----------------------------------------------------------------------------- the release

# The tensors of the released DiT-XL/2 256x256 checkpoint (and of SiT-XL/2, the same
# network), written out by hand from the original code: timm's PatchEmbed and Attention
# (fused qkv with bias), the 2-layer timestep MLP, a 1000 + 1 row label table, and the
# fixed position embedding stored as a (frozen) parameter.
RELEASE_TOP_LEVEL = {
    "pos_embed": (1, 256, 1152),
    "x_embedder.proj.weight": (1152, 4, 2, 2),
    "x_embedder.proj.bias": (1152,),
    "t_embedder.mlp.0.weight": (1152, 256),
    "t_embedder.mlp.0.bias": (1152,),
    "t_embedder.mlp.2.weight": (1152, 1152),
    "t_embedder.mlp.2.bias": (1152,),
    "y_embedder.embedding_table.weight": (1001, 1152),
    "final_layer.linear.weight": (32, 1152),
    "final_layer.linear.bias": (32,),
    "final_layer.adaLN_modulation.1.weight": (2304, 1152),
    "final_layer.adaLN_modulation.1.bias": (2304,),
}
RELEASE_PER_BLOCK = {
    "attn.qkv.weight": (3456, 1152),
    "attn.qkv.bias": (3456,),
    "attn.proj.weight": (1152, 1152),
    "attn.proj.bias": (1152,),
    "mlp.fc1.weight": (4608, 1152),
    "mlp.fc1.bias": (4608,),
    "mlp.fc2.weight": (1152, 4608),
    "mlp.fc2.bias": (1152,),
    "adaLN_modulation.1.weight": (6912, 1152),
    "adaLN_modulation.1.bias": (6912,),
}
RELEASE_DEPTH = 28
RELEASE_NUMEL = 675_129_632  # "675M parameters" (DiT paper), position embedding included


@pytest.fixture(scope="module")
def release_state_dict() -> dict[str, torch.Tensor]:
    """A DiT-XL/2-shaped state dict with the release's keys. torch.empty reserves the 2.7 GB
    without touching it, so this costs no time and (almost) no resident memory."""
    shapes = dict(RELEASE_TOP_LEVEL)
    for i in range(RELEASE_DEPTH):
        shapes.update({f"blocks.{i}.{k}": s for k, s in RELEASE_PER_BLOCK.items()})
    return {k: torch.empty(s) for k, s in shapes.items()}


def test_release_dit_xl2_loads_and_is_inferred(release_state_dict):
    sd = release_state_dict
    assert sum(t.numel() for t in sd.values()) == RELEASE_NUMEL
    config = infer_dit_config(sd)
    assert config.depth == 28
    assert config.hidden_size == 1152
    assert config.num_heads == 16
    assert config.patch_size == 2
    assert config.input_size == 32
    assert config.in_channels == 4
    assert config.num_classes == 1000
    assert config.learn_sigma is True and config.out_channels == 8
    assert config.mlp_ratio == 4.0
    assert config.objective == "diffusion" and config.space == "latent"
    assert config == named_config("DiT-XL/2")

    model = model_from_state_dict(config, sd)
    loaded = model.state_dict()
    assert set(loaded) == set(sd)
    # The tensors are adopted, not copied: loading a 2.7 GB checkpoint does not double it.
    assert all(loaded[k].data_ptr() == sd[k].data_ptr() for k in sd)
    assert count_parameters(model) + model.pos_embed.numel() == RELEASE_NUMEL


def test_release_sit_xl2_is_the_same_network_with_flow(release_state_dict):
    config = infer_dit_config(release_state_dict, objective="flow")
    assert config == named_config("SiT-XL/2")
    assert config.objective == "flow"
    model = model_from_state_dict(config, release_state_dict)
    assert model.config.objective == "flow"


# ----------------------------------------------------------------------------- small models

SMALL = DiTConfig(
    input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
    mlp_ratio=2.0, num_classes=10,
)
HEADS = {"num_heads": SMALL.num_heads}  # 32 is not a standard width: files need the heads


def random_model(config: DiTConfig = SMALL, seed: int = 0):
    torch.manual_seed(seed)
    return ref.randomize_parameters_(build_model(config), seed).eval()


def outputs(model) -> torch.Tensor:
    """The model's output on fixed inputs (flow and diffusion timesteps, labels incl. the
    null class); independent of the config's objective, so models loaded as either compare."""
    c = model.config
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(3, c.in_channels, c.input_size, c.input_size, generator=gen)
    t = torch.tensor([0.0, 0.5, 999.0])
    y = torch.tensor([0, c.num_classes - 1, c.num_classes if c.has_null_class else 1])
    with torch.no_grad():
        return model.to(torch.float32)(x, t, y)


def assert_same_model(loaded, original) -> None:
    expected = original.config
    if expected.in_channels == 4 and not Path(loaded.source).is_dir():
        # Checkpoint files get the original samplers' 3-of-4-channel guidance; folders keep theirs.
        expected = expected.replace(guided_channels=3)
    assert loaded.config == expected
    assert torch.equal(outputs(loaded), outputs(original))


@pytest.fixture(scope="module")
def model():
    return random_model(seed=0)


@pytest.fixture(scope="module")
def ema():
    return random_model(seed=1)


def test_small_models_differ(model, ema):
    """The round-trip tests below can tell the two weight sets apart."""
    assert not torch.allclose(outputs(model), outputs(ema))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_plain_state_dict_pt(tmp_path, model, zip_format):
    path = tmp_path / "DiT-tiny.pt"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=zip_format)
    loaded = load_model(path, **HEADS)
    assert_same_model(loaded, model)
    assert loaded.compression == [] and loaded.source == str(path)


def training_checkpoint(model, ema) -> dict:
    """What the original train.py (DiT and SiT) saves every `ckpt_every` steps; the optimizer
    state is that of a real step (tensors, ints, floats, nested dicts)."""
    trainee = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(trainee.parameters(), lr=1e-4, weight_decay=0)
    trainee(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([3, 4])).square().mean().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "opt": opt.state_dict(),
        "args": argparse.Namespace(
            model="DiT-XL/2", image_size=256, num_classes=1000, epochs=1400, global_batch_size=256,
            global_seed=0, vae="ema", results_dir="results", ckpt_every=50_000,
        ),
    }


def test_training_checkpoint_prefers_ema(tmp_path, model, ema):
    path = tmp_path / "0400000.pt"
    torch.save(training_checkpoint(model, ema), path)
    assert_same_model(load_model(path, **HEADS), ema)  # default safe loader, EMA preferred
    assert_same_model(load_model(path, weights="ema", **HEADS), ema)
    assert_same_model(load_model(path, weights="model", **HEADS), model)


def test_checkpoint_with_model_only_uses_it(tmp_path, model):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=1e-4)}, path)
    assert_same_model(load_model(path, **HEADS), model)
    with pytest.raises(CheckpointError, match="'ema'"):
        load_model(path, weights="ema", **HEADS)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_wrapper_prefixed_keys_load(tmp_path, model, ema, prefix):
    """DDP (`module.`) and torch.compile (`_orig_mod.`) wrappers prefix every key."""
    path = tmp_path / "wrapped.pt"
    ckpt = training_checkpoint(model, ema)
    ckpt["model"] = {prefix + k: v for k, v in ckpt["model"].items()}
    ckpt["ema"] = {prefix + k: v for k, v in ckpt["ema"].items()}
    torch.save(ckpt, path)
    assert_same_model(load_model(path, **HEADS), ema)
    torch.save({prefix + k: v for k, v in model.state_dict().items()}, path)
    assert_same_model(load_model(path, **HEADS), model)


def test_safetensors_state_dict(tmp_path, model):
    path = tmp_path / "DiT-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    assert_same_model(load_model(path, **HEADS), model)


@pytest.mark.parametrize(
    "filename,objective",
    [
        ("SiT-XL-2-256x256.pt", "flow"),
        ("sit_b2_0100000.pt", "flow"),
        ("DiT-XL-2-256x256.pt", "diffusion"),
        ("0400000.pt", "diffusion"),
    ],
)
def test_objective_guessed_from_file_name(tmp_path, filename, objective):
    """A standard width needs no head count; the objective follows the family in the name."""
    config = DiTConfig(
        input_size=4, patch_size=2, hidden_size=384, depth=1, num_heads=6, mlp_ratio=1.0, num_classes=10
    )
    small = random_model(config, seed=3)
    torch.save(small.state_dict(), tmp_path / filename)
    loaded = load_model(tmp_path / filename)
    assert loaded.config.objective == objective
    assert loaded.config.num_heads == 6
    assert torch.equal(outputs(loaded), outputs(small))
    other = "diffusion" if objective == "flow" else "flow"
    assert load_model(tmp_path / filename, objective=other).config.objective == other


@pytest.mark.parametrize("filename", ["DiT-XL-2-transition.pt", "dit-b2-position-ablation.pt"])
def test_objective_guess_matches_family_not_substring(tmp_path, model, filename):
    """A DiT file whose name merely contains the letters "sit" (transition, position,
    composite, ...) is still a diffusion model."""
    torch.save(model.state_dict(), tmp_path / filename)
    assert load_model(tmp_path / filename, **HEADS).config.objective == "diffusion"


def test_any_mlp_width_round_trips_through_a_file(tmp_path):
    """A channel-pruned MLP can have any width; the config inferred from the tensors must
    rebuild exactly that width (44 * (15 / 44) is 14.999999999999998 in floating point)."""
    config = DiTConfig(
        input_size=4, patch_size=2, hidden_size=44, depth=1, num_heads=4, mlp_ratio=15.5 / 44, num_classes=3
    )
    original = random_model(config, seed=5)
    assert original.blocks[0].mlp.fc1.out_features == 15
    torch.save(original.state_dict(), tmp_path / "pruned.pt")
    loaded = load_model(tmp_path / "pruned.pt", num_heads=4)
    assert loaded.config.mlp_hidden == 15
    assert torch.equal(outputs(loaded), outputs(original))


def test_folder_round_trip(tmp_path):
    """The folder keeps what tensors cannot tell: objective, space, head count, and whether
    the label table has a null row."""
    config = SMALL.replace(objective="flow", space="pixel", class_dropout_prob=0.0, num_heads=4, name="tiny")
    original = random_model(config, seed=4)
    folder = save_model(original, tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(folder)
    assert_same_model(loaded, original)
    assert loaded.config.to_dict() == config.to_dict()
    assert loaded.compression == []


def test_folder_with_ema(tmp_path, model, ema):
    folder = save_model(model, tmp_path / "model", ema=ema)
    assert_same_model(load_model(folder), ema)
    assert_same_model(load_model(folder, weights="ema"), ema)
    assert_same_model(load_model(folder, weights="model"), model)
    folder = save_model(model, tmp_path / "model", ema=ema.state_dict())  # a state dict works too
    assert_same_model(load_model(folder), ema)


def test_folder_without_ema_refuses_weights_ema(tmp_path, model):
    folder = save_model(model, tmp_path / "model")
    assert_same_model(load_model(folder, weights="model"), model)
    with pytest.raises(CheckpointError, match="ema.safetensors"):
        load_model(folder, weights="ema")


def test_compression_records_round_trip(tmp_path, model):
    records = [
        {"method": "tinyfusion", "kept_blocks": [0], "params": {"steps": 100, "tau": 0.5}},
        {"method": "finetune", "steps": 2000, "lr": 1e-4},
    ]
    folder = save_model(model, tmp_path / "explicit", compression=records)
    assert load_model(folder).compression == records

    pruned = random_model(seed=0)
    pruned.compression = records[:1]
    folder = save_model(pruned, tmp_path / "from-attribute")
    assert load_model(folder).compression == records[:1]


def test_saving_over_a_folder_replaces_it(tmp_path, model, ema):
    folder = tmp_path / "model"
    save_model(model, folder, ema=ema, compression=[{"method": "a"}])
    save_model(ema, folder)
    loaded = load_model(folder)
    assert_same_model(loaded, ema)
    assert loaded.compression == []
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folders left


# ----------------------------------------------------------------------------- strict errors


def small_state_dict(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_missing_key_is_named(tmp_path, model):
    sd = small_state_dict(model)
    del sd["blocks.1.attn.proj.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys blocks\.1\.attn\.proj\.bias"):
        model_from_state_dict(infer_dit_config(sd, **HEADS), sd)
    path = tmp_path / "broken.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"broken\.pt.*missing keys blocks\.1\.attn\.proj\.bias"):
        load_model(path, **HEADS)


def test_missing_essential_key_says_not_a_dit(model):
    sd = small_state_dict(model)
    del sd["pos_embed"]
    with pytest.raises(CheckpointError, match="not a DiT/SiT state dict: missing pos_embed"):
        infer_dit_config(sd, **HEADS)


def test_unexpected_key_is_named(model):
    sd = small_state_dict(model)
    sd["blocks.0.attn.q_norm.weight"] = torch.ones(16)
    with pytest.raises(CheckpointError, match=r"unexpected keys blocks\.0\.attn\.q_norm\.weight"):
        model_from_state_dict(infer_dit_config(sd, **HEADS), sd)


def test_wrong_shape_is_named(model):
    sd = small_state_dict(model)
    sd["t_embedder.mlp.0.weight"] = torch.zeros(32, 128)
    with pytest.raises(CheckpointError, match=r"t_embedder\.mlp\.0\.weight has shape \(32, 128\).*\(32, 256\)"):
        model_from_state_dict(infer_dit_config(sd, **HEADS), sd)


def test_non_contiguous_blocks_are_refused(model):
    sd = small_state_dict(model)
    for k in [k for k in sd if k.startswith("blocks.1.")]:
        sd[k.replace("blocks.1.", "blocks.3.")] = sd.pop(k)
    with pytest.raises(CheckpointError, match="block indices"):
        infer_dit_config(sd, **HEADS)


def test_non_standard_width_needs_head_count(tmp_path, model):
    with pytest.raises(CheckpointError, match="pass the head count.*num_heads"):
        infer_dit_config(model.state_dict())
    path = tmp_path / "DiT-tiny.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="hidden size 32.*num_heads"):
        load_model(path)


def test_truncated_pt_is_refused(tmp_path, model):
    path = tmp_path / "DiT-tiny.pt"
    torch.save(model.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="DiT-tiny.pt: not a readable PyTorch checkpoint.*complete"):
        load_model(path, **HEADS)


@pytest.mark.parametrize("kind", ["legacy-truncated", "empty"])
def test_truncated_legacy_or_empty_pt_is_refused(tmp_path, model, kind):
    path = tmp_path / "DiT-tiny.pt"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if kind == "legacy-truncated" else b"")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_model(path, **HEADS)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors_is_refused(tmp_path, model, damage):
    path = tmp_path / "DiT-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x10\x00" + data[2:])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(path, **HEADS)


@pytest.mark.parametrize(
    "text",
    ["this is not a checkpoint\n", "hello world\n", '{"model": "DiT-XL/2"}\n'],
    ids=["sentence", "hello", "json"],
)
def test_text_file_is_refused(tmp_path, text):
    path = tmp_path / "notes.pt"
    path.write_text(text)
    with pytest.raises(CheckpointError, match="notes.pt: not a readable PyTorch checkpoint") as err:
        load_model(path, **HEADS)
    # A broken file is not an untrusted one: do not advise running code from it.
    assert "trust_checkpoint" not in str(err.value)


def test_checkpoint_pickling_unknown_class_needs_trust(tmp_path, model, ema):
    """A training checkpoint whose args hold a class torch's safe loader does not know."""
    ckpt = training_checkpoint(model, ema)
    ckpt["args"].results_dir = pathlib.PurePosixPath("/data/results")
    path = tmp_path / "0050000.pt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="trust_checkpoint=True"):
        load_model(path, **HEADS)
    assert_same_model(load_model(path, trust_checkpoint=True, **HEADS), ema)


def test_nonexistent_path(tmp_path):
    path = tmp_path / "DiT-XL-2-256x256.pt"
    with pytest.raises(FileNotFoundError, match="DiT-XL-2-256x256.pt"):
        load_model(path)


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)


def test_newer_format_version_is_refused(tmp_path, model):
    folder = save_model(model, tmp_path / "model")
    meta = json.loads((folder / "config.json").read_text())
    meta["format_version"] += 1
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format version 2 is newer.*upgrade leandit"):
        load_model(folder)


def test_bad_weights_choice(tmp_path, model):
    path = tmp_path / "DiT-tiny.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(ValueError, match="weights must be"):
        load_model(path, weights="best", **HEADS)
    with pytest.raises(CheckpointError, match="plain state dict"):
        load_model(path, weights="ema", **HEADS)


# ----------------------------------------------------------------------------- atomic saving


def failing_after_first_call(monkeypatch):
    """Make the second safetensors write (the EMA file) fail, as a full disk would."""
    real = model_io.save_file
    calls = []

    def save_file_then_fail(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) > 1:
            raise OSError(28, "No space left on device (simulated)")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(model_io, "save_file", save_file_then_fail)
    return calls


def test_failed_save_leaves_previous_folder_intact(tmp_path, monkeypatch, model, ema):
    folder = tmp_path / "model"
    save_model(model, folder, compression=[{"method": "before"}])
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    calls = failing_after_first_call(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        save_model(ema, folder, ema=model, compression=[{"method": "after"}])
    assert len(calls) == 2  # the failure did happen mid-write

    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folders left
    monkeypatch.undo()
    loaded = load_model(folder)
    assert_same_model(loaded, model)
    assert loaded.compression == [{"method": "before"}]


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch, model, ema):
    failing_after_first_call(monkeypatch)
    with pytest.raises(OSError):
        save_model(model, tmp_path / "model", ema=ema)
    assert list(tmp_path.iterdir()) == []

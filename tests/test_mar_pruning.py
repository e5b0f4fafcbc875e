"""Depth pruning of MAR (TinyMAR): its encoder and decoder blocks as one ordered list (encoder
first) for the calibration set and every baseline, learnable gates (their gradients checked
against an explicit-mask computation), LoRA, export, recovery (KD on the head, RepKD aligned
within each list), the CLI, and the refusals of methods that do not apply to MAR."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import leandit
from leandit.cli import main
from leandit.compress.depth import (
    LearnablePruningJob,
    LearnableSettings,
    block_inputs_outputs,
    calibration_loss,
    explicit,
    make_calibration_set,
    oracle,
    parse_scheme,
    pruned_model,
    random_method,
    score_method,
)
from leandit.compress.depth.lists import check_scheme_lists, crossing_groups, describe_crossing
from leandit.compress.depth.lora import add_lora, lora_targets
from leandit.compress.recovery import RecoveryJob, RecoverySettings, record_alignment, teacher_layers
from leandit.diffusion import make_objective
from leandit.diffusion.noise import StepRandom
from leandit.models.blocks import keep_blocks, list_ranges, running_blocks
from leandit.models.mar import MAR
from leandit.models.mar_config import MARConfig, named_mar_config
from leandit.train.denoising import draw_inputs

# A tiny MAR on digits' shape; the decoder is wider than the encoder so that a block of one
# list confused with one of the other shows as a shape error.
TINY = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, encoder_depth=2, encoder_heads=2,
            decoder_hidden_size=48, decoder_depth=2, decoder_heads=2, buffer_size=4, num_classes=10, head_depth=2,
            head_width=32, space="pixel", attn_dropout=0.0, proj_dropout=0.0)


def tiny_mar(seed: int = 0, std: float = 0.2, **overrides) -> MAR:
    """Random weights everywhere: a fresh MAR's head output is zero (zero-init final layer)."""
    model = MAR(MARConfig(**{**TINY, **overrides}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def make_identity_(block: nn.Module) -> None:
    """A ViT block whose residual branches output exactly 0: block(x) == x."""
    with torch.no_grad():
        for layer in (block.attn.proj, block.mlp.fc2):
            layer.weight.zero_()
            layer.bias.zero_()


def toy_data(n: int = 16, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 1, 8, 8, generator=gen) * 2 - 1, torch.randint(0, 10, (n,), generator=gen))


def prediction(model: nn.Module, inputs, t, y) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs, t, y)


# -- calibration set and baselines ------------------------------------------------------------


def test_calibration_set_and_loss_on_mar_match_a_direct_computation():
    model = tiny_mar()
    cal = make_calibration_set(model, toy_data(), size=6, seed=1)
    assert len(cal) == 6 and cal.channel_dim == -1
    n, m = cal.t.shape
    assert cal.target.shape == (6, m, 4) and cal.xt.index.shape == (6, m) and cal.xt.mask.sum(1).eq(m).all()
    model.eval()
    out = prediction(model, cal.xt, cal.t, cal.y)  # (N, M, 2C)
    direct = ((out[..., :4] - cal.target) ** 2).mean(dim=(1, 2)).mean()
    for batch in (1, 4, 6):  # per-image means: the batch size does not matter
        assert calibration_loss(model, cal, batch_size=batch) == pytest.approx(float(direct), rel=1e-5)
    # Running a subset of blocks scores like the exported copy with those blocks.
    for kept in ([0, 3], [2, 3], [1]):
        copy_ = keep_blocks(model, kept).eval()
        out = prediction(copy_, cal.xt, cal.t, cal.y)
        expected = float(((out[..., :4] - cal.target) ** 2).mean())
        assert calibration_loss(model, cal, kept, batch_size=4) == pytest.approx(expected, rel=1e-5)


def test_block_hooks_see_each_lists_tokens_in_the_combined_order():
    model = tiny_mar()
    cal = make_calibration_set(model, toy_data(), size=5)
    seen: dict[int, list] = {}
    block_inputs_outputs(model, cal, lambda i, a, b: seen.setdefault(i, []).append((a, b)), batch_size=2)
    assert sorted(seen) == [0, 1, 2, 3] and all(len(v) == 3 for v in seen.values())  # 3 batches
    known = 16 - cal.xt.mask[0].sum().item()
    for i in (0, 1):  # the encoder: buffer + known tokens at the encoder's width
        assert seen[i][0][0].shape == (2, 4 + known, 32)
    for i in (2, 3):  # the decoder: buffer + every position at the decoder's width
        assert seen[i][0][0].shape == (2, 4 + 16, 48)
    torch.testing.assert_close(seen[0][1][1], seen[1][1][0])  # a block's output is the next block's input
    torch.testing.assert_close(seen[2][1][1], seen[3][1][0])


def test_every_baseline_runs_on_mar_and_drops_identity_blocks_of_both_lists():
    model = tiny_mar()
    make_identity_(model.encoder_blocks[1])  # combined block 1
    make_identity_(model.decoder_blocks[0])  # combined block 2
    cal = make_calibration_set(model, toy_data(), size=8)
    scheme = parse_scheme("1:2", 4)
    for method in ("shortgpt", "fluxlite", "sensitivity"):
        decision = score_method(method, model, cal, scheme, batch_size=4, progress=False)
        assert decision.kept == [0, 3], method
        assert decision.scores[1] == pytest.approx(0.0, abs=1e-6) and decision.scores[2] == pytest.approx(0.0, abs=1e-6)
        assert min(abs(decision.scores[0]), abs(decision.scores[3])) > 1e-4
    assert oracle(scheme).kept == [0, 3] and oracle(parse_scheme("3:4", 4)).kept == [0, 2, 3]
    assert len(random_method(model, None, scheme, "first", seed=3).kept) == 2
    for pick in ("min-loss", "median-loss"):
        decision = random_method(model, cal, scheme, pick, count=6, seed=0, batch_size=4, progress=False)
        assert scheme.fits(torch.tensor([float(i in decision.kept) for i in range(4)]))
        assert decision.details["calibration_loss"] == pytest.approx(calibration_loss(model, cal, decision.kept, 4))
    # Removing both identity blocks changes nothing: the loss of [0, 3] is the full model's.
    assert calibration_loss(model, cal, [0, 3]) == pytest.approx(calibration_loss(model, cal), rel=1e-6)


# -- learnable pruning ------------------------------------------------------------------------


class _Mixed(nn.Module):
    """block(x) mixed with x by an explicit mask column: the gate written out by hand."""

    def __init__(self, block: nn.Module, holder: dict, index: int):
        super().__init__()
        self.block, self.holder, self.index = block, holder, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.holder["m"][:, self.index].reshape(-1, 1, 1)
        return x + m * (self.block(x) - x)


@pytest.mark.parametrize("scheme_text", ["1:2", "1:3,1:1", "2:3,1:1"])
def test_gate_gradients_equal_an_explicit_mask_computation(scheme_text):
    """The job's straight-through gate gradient = sum over images of the soft-max Jacobian times
    dL/dm, with dL/dm from a copy of the model whose blocks are mixed by hand ("1:3,1:1" and
    "2:3,1:1" have a group spanning the encoder's last blocks and the decoder's first)."""
    model = tiny_mar(seed=1)
    settings = LearnableSettings(scheme=scheme_text, recoverability="frozen", temperature_start=1.7)
    job = LearnablePruningJob(copy.deepcopy(model), settings)
    with torch.no_grad():
        job.gates.logits.copy_(torch.randn(job.gates.num_candidates, generator=torch.Generator().manual_seed(5)) * 0.01)
    data = toy_data(4, seed=2)
    batch = (data.tensors[0], data.tensors[1])

    def random() -> StepRandom:
        return StepRandom(7, 0, 4, 0, 1, "cpu")

    loss, _ = job.compute_loss(job.module, batch, random())
    loss.backward()
    got = job.gates.logits.grad.clone()
    assert got.abs().max() > 1e-6

    # The same draws, then the gate by hand.
    r = random()
    x0, t, noise, y = draw_inputs(job.objective, batch, r, job.class_dropout, job.conditioning)
    uniform = r.rand(job.gates.num_candidates)  # (N, C)
    scheme = parse_scheme(scheme_text, 4)
    temperature, scale = settings.temperature_start, settings.logit_scale
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-10, 1 - 1e-10)))
    logits = job.gates.logits.detach() * scale
    softs, hards, layouts, start = [], [], [], 0
    for group in scheme.groups:
        c = group.num_candidates
        soft = torch.softmax((logits[start:start + c] + gumbel[:, start:start + c]) / temperature, dim=-1)  # (N, c)
        softs.append(soft)
        hards.append(torch.nn.functional.one_hot(soft.argmax(-1), c).float())
        layout = torch.zeros(c, 4)
        layout[:, group.start:group.start + group.m] = group.candidates()
        layouts.append(layout)
        start += c
    masks = sum(h @ lay for h, lay in zip(hards, layouts))  # (N, L) 0/1
    holder = {"m": masks.clone().requires_grad_(True)}
    by_hand = copy.deepcopy(model)
    by_hand.encoder_blocks = nn.ModuleList(_Mixed(b, holder, i) for i, b in enumerate(model.encoder_blocks))
    by_hand.decoder_blocks = nn.ModuleList(_Mixed(b, holder, 2 + i) for i, b in enumerate(model.decoder_blocks))
    terms = job.objective.training_losses(lambda x, tt: by_hand(x, tt, y), x0, t, noise)
    torch.testing.assert_close(terms["loss"].mean(), loss.detach())  # the same forward
    terms["loss"].mean().backward()
    dm = holder["m"].grad  # (N, L)
    expected = []
    for soft, layout in zip(softs, layouts):
        g = dm @ layout.T  # (N, c): dL/d(one-hot entry)
        expected.append((scale / temperature) * (soft * (g - (soft * g).sum(-1, keepdim=True))).sum(0))
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-4, atol=1e-7)


def test_lora_lands_on_the_linear_layers_of_both_lists_and_not_on_the_head():
    model = tiny_mar()
    targets = lora_targets(model)
    expected = [f"{name}.{i}.{part}" for name in ("encoder_blocks", "decoder_blocks") for i in range(2)
                for part in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert targets == expected
    add_lora(model, rank=2)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 32 and all("lora_" in n and n.split(".")[0] in ("encoder_blocks", "decoder_blocks") for n in trainable)
    assert not any(hasattr(m, "lora_A") for m in model.diffloss.modules())


def test_schemes_that_cross_the_encoder_decoder_boundary_are_named():
    with torch.device("meta"):
        mar_l = MAR(named_mar_config("MAR-L"))
    ranges = list_ranges(mar_l)
    assert ranges == [("encoder_blocks", 0, 16), ("decoder_blocks", 16, 32)]
    for text in ("1:2", "2:4", "3:4", "7:8"):  # groups that divide 16 never cross
        assert describe_crossing(parse_scheme(text, 32), ranges) is None
    mixed = parse_scheme(",".join(["1:2"] * 7 + ["2:3"] + ["1:2"] * 7 + ["1:1"]), 32)
    assert crossing_groups(mixed, ranges) == [(7, ["encoder_blocks", "decoder_blocks"])]
    assert "group 2:3 over blocks 14-16 spans encoder_blocks and decoder_blocks" in describe_crossing(mixed, ranges)
    # A scheme that may keep no decoder block is refused; one whose every choice keeps one is not.
    tiny = tiny_mar()
    for text in ("1:4", "2:4", "1:1,1:3"):
        with pytest.raises(ValueError, match="may keep none of the decoder_blocks"):
            check_scheme_lists(tiny, parse_scheme(text, 4))
    with pytest.raises(ValueError, match="may keep none of the decoder_blocks"):
        LearnablePruningJob(tiny, LearnableSettings(scheme="2:4", recoverability="frozen"))
    for text in ("1:2", "3:4", "1:3,1:1", "1:1,2:3"):
        check_scheme_lists(tiny, parse_scheme(text, 4))


# -- export -----------------------------------------------------------------------------------


def _compare_outputs(a: nn.Module, b: nn.Module) -> None:
    cal = make_calibration_set(a, toy_data(), size=4)
    torch.testing.assert_close(prediction(a.eval(), cal.xt, cal.t, cal.y), prediction(b.eval(), cal.xt, cal.t, cal.y))


def test_export_round_trip_records_the_list_of_every_kept_block(tmp_path):
    source = tiny_mar()
    scheme = parse_scheme("1:3,1:1", 4)  # group 0 spans encoder blocks 0-1 and decoder block 0
    model = pruned_model(source, explicit([1, 3], 4, scheme), source_name="teacher")
    folder = leandit.save_model(model, tmp_path / "pruned")
    loaded = leandit.load_model(folder)
    assert (loaded.config.encoder_depth, loaded.config.decoder_depth) == (1, 1)
    original, state = source.state_dict(), loaded.state_dict()
    rename = {"encoder_blocks.0.": "encoder_blocks.1.", "decoder_blocks.0.": "decoder_blocks.1."}
    for key, value in state.items():
        old = next((key.replace(new, o, 1) for new, o in rename.items() if key.startswith(new)), key)
        assert torch.equal(value, original[old]), key
    assert len(state) == len(original) - 2 * len([k for k in original if k.startswith("encoder_blocks.0.")])
    record = json.loads((folder / "compression.json").read_text())[-1]
    assert record["kept_indices"] == [1, 3] and record["source_depth"] == 4
    assert record["kept_by_list"] == {"encoder_blocks": [1], "decoder_blocks": [1]}
    assert record["source_list_depths"] == {"encoder_blocks": 2, "decoder_blocks": 2}
    assert record["groups"][0]["crosses"] == ["encoder_blocks", "decoder_blocks"] and "crosses" not in record["groups"][1]
    with running_blocks(source, [1, 3]):
        _compare_outputs(loaded, source)


def test_a_prune_may_remove_every_encoder_block_but_not_every_decoder_block(tmp_path):
    source = tiny_mar()
    folder = leandit.save_model(pruned_model(source, explicit([2, 3], 4)), tmp_path / "no-encoder")
    loaded = leandit.load_model(folder)
    assert (loaded.config.encoder_depth, loaded.config.decoder_depth) == (0, 2)
    assert not any(k.startswith("encoder_blocks") for k in loaded.state_dict())
    assert json.loads((folder / "compression.json").read_text())[-1]["kept_by_list"] == {"encoder_blocks": [], "decoder_blocks": [0, 1]}
    with running_blocks(source, [2, 3]):
        _compare_outputs(loaded, source)
    with pytest.raises(ValueError, match=r"keeps none of the decoder_blocks \(blocks 2-3\): without decoder blocks"):
        pruned_model(source, explicit([0, 1], 4))

    # Why: without decoder blocks an unknown token's condition is its mask token and position
    # only; the known tokens and the class change nothing the head sees for it.
    headless = tiny_mar(decoder_depth=0)
    cal = make_calibration_set(headless, toy_data(), size=2)
    other = copy.deepcopy(cal.xt)
    other.tokens = torch.randn_like(other.tokens)
    torch.testing.assert_close(prediction(headless, cal.xt, cal.t, cal.y), prediction(headless, other, cal.t, (cal.y + 3) % 10))


# -- recovery ---------------------------------------------------------------------------------


def test_recovery_alignment_stays_within_each_list():
    source = tiny_mar()
    crossing = pruned_model(source, explicit([0, 3], 4, parse_scheme("1:3,1:1", 4))).compression[-1]
    # Kept encoder block 0 stands for the removed encoder block 1, not for decoder block 0.
    assert record_alignment(crossing, "segment") == [1, 3] and record_alignment(crossing, "group-end") == [1, 3]
    one_list = {k: v for k, v in crossing.items() if k != "source_list_depths"}
    assert record_alignment(one_list, "segment") == [2, 3]  # what one list would say
    paired = pruned_model(source, explicit([0, 2], 4, parse_scheme("1:2", 4))).compression[-1]
    assert record_alignment(paired) == [1, 3]
    # A chain: 3 + 3 -> keep (0, 2 | 0, 1, 2) -> 2 + 3 -> keep (1 | 0, 2) by "2:3,1:2", whose first
    # group [0, 1 | 2] spans the new boundary. Step 2 aligns 1 -> 1, 2 -> 2, 4 -> 4 (each stretch
    # cut at the list end); step 1 aligns encoder 0 -> 1 (it stands for the removed encoder 1),
    # 2 -> 2, and the decoder to itself: the original teacher blocks are 2, 3 and 5.
    deep = tiny_mar(encoder_depth=3, decoder_depth=3)
    first = pruned_model(deep, explicit([0, 2, 3, 4, 5], 6))
    assert first.compression[-1]["source_list_depths"] == {"encoder_blocks": 3, "decoder_blocks": 3}
    second = pruned_model(first, explicit([1, 2, 4], 5, parse_scheme("2:3,1:2", 5)))
    assert second.compression[-1]["source_list_depths"] == {"encoder_blocks": 2, "decoder_blocks": 3}
    assert teacher_layers(second.compression, [], 3, 6) == [2, 3, 5]
    assert teacher_layers(second.compression, first.compression, 3, 5) == [1, 2, 4]


def _recovery_batch():
    data = toy_data(4, seed=4)
    return (data.tensors[0], data.tensors[1])


def test_kd_and_repkd_are_zero_when_the_student_is_the_teacher_and_both_see_the_same_inputs():
    teacher = tiny_mar()
    student = copy.deepcopy(teacher)
    calls = []
    for name, model in (("student", student), ("teacher", teacher)):
        model.register_forward_pre_hook(lambda m, args, name=name: calls.append((name, args)))
    job = RecoveryJob(student, teacher, RecoverySettings(), [0, 1, 2, 3])
    loss, logs = job.compute_loss(job.module, _recovery_batch(), StepRandom(0, 0, 4, 0, 1, "cpu"))
    logs = {k: float(v) for k, v in logs.items()}
    assert logs["kd_mse"] == 0.0 and logs["repkd"] == 0.0 and logs["diffusion"] > 0
    # normal_kl(-1 + lv2 - lv1 + ...) rounds in float32 even for identical distributions.
    assert logs["kd_kl"] < 1e-8
    (_, (xs, ts, ys)), (_, (xt, tt, yt)) = calls
    for field in ("tokens", "mask", "index", "noisy"):
        assert torch.equal(getattr(xs, field), getattr(xt, field)), field
    assert torch.equal(ts, tt) and torch.equal(ys, yt)

    # A teacher in another dtype gets the same inputs cast (MaskedTokens.to(dtype=...)).
    calls.clear()
    job = RecoveryJob(student, copy.deepcopy(teacher), RecoverySettings(), [0, 1, 2, 3], teacher_dtype=torch.float64)
    job.setup(torch.device("cpu"))
    job.teacher.register_forward_pre_hook(lambda m, args: calls.append(("teacher64", args)))
    _, logs = job.compute_loss(job.module, _recovery_batch(), StepRandom(0, 0, 4, 0, 1, "cpu"))
    assert calls[-1][1][0].noisy.dtype == torch.float64 and float(logs["kd"]) < 1e-8
    # A bf16 teacher (as on GPUs): the same KD up to bf16 rounding, for a pruned student.
    pruned = pruned_model(teacher, explicit([1, 2], 4, parse_scheme("1:2", 4)))
    kd = {}
    for dtype in (None, torch.bfloat16):
        job = RecoveryJob(copy.deepcopy(pruned), copy.deepcopy(teacher), RecoverySettings(), [1, 3], teacher_dtype=dtype)
        job.setup(torch.device("cpu"))
        kd[dtype] = float(job.compute_loss(job.module, _recovery_batch(), StepRandom(0, 0, 4, 0, 1, "cpu"))[1]["kd"])
    assert kd[None] > 0.01 and kd[torch.bfloat16] == pytest.approx(kd[None], rel=0.05)


def test_repkd_alignment_picks_the_teacher_blocks_each_student_block_stands_for():
    """A teacher whose encoder block 1 and decoder block 0 are identities, pruned to [0, 3] by a
    scheme whose first group spans the boundary: the student computes exactly what the teacher
    does, so the aligned RepKD (encoder 0 -> teacher 1, decoder -> teacher 3) is 0; aligning
    encoder 0 with decoder block 0 (one list's rule) is refused."""
    teacher = tiny_mar()
    make_identity_(teacher.encoder_blocks[1])
    make_identity_(teacher.decoder_blocks[0])
    student = pruned_model(teacher, explicit([0, 3], 4, parse_scheme("1:3,1:1", 4)))
    layers = teacher_layers(student.compression, teacher.compression, 2, 4)
    assert layers == [1, 3]
    settings = RecoverySettings(repkd_k=None)
    job = RecoveryJob(student, teacher, settings, layers)
    _, logs = job.compute_loss(job.module, _recovery_batch(), StepRandom(1, 0, 4, 0, 1, "cpu"))
    assert float(logs["repkd"]) < 1e-10 and float(logs["kd"]) < 1e-8
    job = RecoveryJob(student, teacher, settings, [1, 2])  # the student's decoder block -> the identity before it
    _, logs = job.compute_loss(job.module, _recovery_batch(), StepRandom(1, 0, 4, 0, 1, "cpu"))
    assert float(logs["repkd"]) > 1e-4
    with pytest.raises(ValueError, match="student block 0 is one of its encoder_blocks but is aligned with teacher block 2"):
        RecoveryJob(student, teacher, settings, [2, 3])
    wider = tiny_mar(decoder_hidden_size=64)
    with pytest.raises(ValueError, match="decoder_hidden_size is 64 but the student's is 48"):
        RecoveryJob(student, wider, settings, [1, 3])


# -- the CLI ----------------------------------------------------------------------------------

LOOP = ["--batch-size", "8", "--log-every", "1", "--checkpoint-every", "2", "--device", "cpu", "--precision", "fp32",
        "--lr", "1e-3", "--quiet"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mar") / "teacher"
    leandit.save_model(tiny_mar(std=0.15), folder)
    return folder


def _main(*argv: str) -> None:
    assert main(list(argv)) == 0


def test_learnable_prune_then_finetune_on_mar_from_the_cli(source, tmp_path, capsys):
    out = tmp_path / "prune"
    _main("prune", str(source), "--method", "learnable", "--scheme", "1:3,1:1", "--steps", "3", *LOOP, "--out", str(out),
          "--merge-delta")
    err = capsys.readouterr().err
    assert "warning: scheme 1:3,1:1: group 1:3 over blocks 0-2 spans encoder_blocks and decoder_blocks" in err
    pruned = leandit.load_model(out / "model")
    record = json.loads((out / "model" / "compression.json").read_text())[-1]
    kept = record["kept_indices"]
    assert len(kept) == 2 and 3 in kept and record["method"] == "learnable" and record["groups"][0]["crosses"]
    assert record["kept_by_list"] == {"encoder_blocks": [i for i in kept if i < 2], "decoder_blocks": [i - 2 for i in kept if i >= 2]}
    assert pruned.config.encoder_depth + pruned.config.decoder_depth == 2 and pruned.config.decoder_depth >= 1
    assert (out / "decision.json").exists() and (out / "decisions.png").exists()
    # --merge-delta: each kept block is its source block plus the learned LoRA delta.
    assert record["weights"] == "lora-merged"
    original = leandit.load_model(source).state_dict()
    for name, indices in record["kept_by_list"].items():
        for new_index, old_index in enumerate(indices):
            merged = pruned.state_dict()[f"{name}.{new_index}.mlp.fc1.weight"]
            assert 0 < (merged - original[f"{name}.{old_index}.mlp.fc1.weight"]).abs().max() < 0.1, (name, old_index)
            assert torch.equal(pruned.state_dict()[f"{name}.{new_index}.norm1.weight"], original[f"{name}.{old_index}.norm1.weight"])

    tuned = tmp_path / "finetune"
    _main("finetune", str(out / "model"), "--teacher", str(source), "--mix", "masked-kd", "--steps", "2", *LOOP, "--out", str(tuned))
    history = json.loads((tuned / "model" / "compression.json").read_text())
    assert [r["method"] for r in history] == ["learnable", "recovery"]
    assert history[-1]["teacher_layers"] == record_alignment(record)
    line = json.loads((tuned / "metrics.jsonl").read_text().splitlines()[0])
    assert line["kd"] > 0 and line["repkd"] > 0 and "kd_kl" in line
    after, before = leandit.load_model(tuned / "model", weights="model").state_dict(), pruned.state_dict()
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 1e-4  # it trained


@pytest.mark.parametrize(
    "method, extra, kept",
    [
        ("shortgpt", ["--scheme", "1:2"], 2),
        ("fluxlite", ["--keep", "3"], 3),
        ("sensitivity", ["--scheme", "1:2"], 2),
        ("oracle", ["--keep", "2"], 2),
        ("random", ["--scheme", "1:2", "--random-pick", "min-loss", "--random-samples", "4"], 2),
        ("indices", ["--indices", "2,3"], 2),  # every encoder block removed
    ],
)
def test_every_baseline_prunes_mar_from_the_cli(method, extra, kept, source, tmp_path):
    out = tmp_path / method
    _main("prune", str(source), "--method", method, *extra, "--calibration-size", "8", "--eval-batch-size", "4",
          "--out", str(out), "--quiet")
    model = leandit.load_model(out / "model")
    assert model.config.encoder_depth + model.config.decoder_depth == kept
    record = json.loads((out / "model" / "compression.json").read_text())[-1]
    assert sum(len(v) for v in record["kept_by_list"].values()) == kept


@pytest.mark.parametrize(
    "argv, message",
    [
        (["prune", "{src}", "--method", "indices", "--indices", "0,1"], "keeps none of the decoder_blocks"),
        (["prune", "{src}", "--method", "learnable", "--scheme", "2:4", "--steps", "2"], "may keep none of the decoder_blocks"),
        (["dynamic", "{src}", "--target", "0.5", "--steps", "2"], "leandit dynamic does not apply to MAR"),
        (["route", "{src}", "--target", "0.5", "--steps", "2"], "leandit route does not apply to MAR"),
        (["route", "{src}", "--target", "0.5", "--steps", "2", "--inpaint", "mixed"], "leandit route does not apply to MAR"),
        (["train", "--model", "{src}", "--data", "digits", "--inpaint", "--steps", "2"], "inpainting fine-tuning does not apply to MAR"),
    ],
)
def test_what_cannot_apply_to_mar_fails_with_one_line_and_writes_nothing(argv, message, source, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [a.replace("{src}", str(source)) for a in argv]
    assert main([*argv, "--out", str(out), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir())

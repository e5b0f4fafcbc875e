"""Recovery fine-tuning: the job's losses and gradients, resume, and `leandit finetune`
and `leandit analyze activations` run as a user runs them (two processes: test_ddp.py)."""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch
from safetensors.torch import load_file

import leandit
from leandit.cli import main
from leandit.compress.depth import explicit, export_pruned, make_calibration_set
from leandit.compress.recovery import RecoveryJob, RecoverySettings
from leandit.data import digits_dataset
from leandit.diffusion import StepRandom
from leandit.train import LoopConfig, Trainer
from conftest import randomize_, run_cli, tiny_model

LOOP = ["--batch-size", "16", "--log-every", "1", "--checkpoint-every", "2", "--device", "cpu", "--precision", "fp32", "--quiet"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A 4-block teacher folder and its 1:2-pruned 2-block student folder."""
    root = tmp_path_factory.mktemp("chain")
    leandit.save_model(randomize_(tiny_model(depth=4), std=0.15), root / "teacher")
    teacher = leandit.load_model(root / "teacher")
    export_pruned(teacher, explicit([0, 3], 4, _scheme("1:2", 4)), root / "student", source_name="teacher")
    export_pruned(teacher, explicit([1, 2], 4, _scheme("1:2", 4)), root / "sibling", source_name="teacher")
    return root


def _scheme(text, depth):
    from leandit.compress.depth import parse_scheme

    return parse_scheme(text, depth)


def _batch(n=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=gen) * 2 - 1, torch.randint(0, 10, (n,), generator=gen)


def _main(*argv: str) -> None:
    assert main(list(argv)) == 0


def test_kd_gradients_flow_into_the_student_only_and_both_see_the_same_inputs():
    teacher = randomize_(tiny_model(depth=4), std=0.15, seed=1)
    student = randomize_(tiny_model(depth=2), std=0.15, seed=2)
    before = copy.deepcopy(teacher.state_dict())
    job = RecoveryJob(student, teacher, RecoverySettings(class_dropout=0.5), teacher_layers=[1, 3])
    seen = {}
    teacher.register_forward_pre_hook(lambda m, args: seen.update(teacher=[a.clone() for a in args]))
    student.register_forward_pre_hook(lambda m, args: seen.update(student=[a.clone() for a in args]))
    loss, logs = job.compute_loss(student, _batch(), StepRandom(0, 0, 8, 0, 1, torch.device("cpu")))
    loss.backward()
    for a, b in zip(seen["student"], seen["teacher"]):  # x_t, timesteps and the dropped labels
        assert torch.equal(a, b)
    assert (seen["student"][2] == 10).any()  # some labels were dropped to the null class
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    value = {k: float(v.detach()) if torch.is_tensor(v) else v for k, v in logs.items()}
    expected = 0.9 * value["kd"] + 0.1 * value["diffusion"] + 1e-2 * value["repkd"]
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert {"kd_mse", "kd_kl", "repkd_dropped", "mse"} <= set(logs)


def test_a_student_identical_to_its_teacher_has_zero_distillation_loss():
    teacher = randomize_(tiny_model(depth=3), std=0.15)
    job = RecoveryJob(copy.deepcopy(teacher), teacher, RecoverySettings(repkd_k=None), teacher_layers=[0, 1, 2])
    loss, logs = job.compute_loss(job.module, _batch(), StepRandom(0, 3, 8, 0, 1, torch.device("cpu")))
    assert logs["kd"].item() < 1e-12 and logs["repkd"].item() < 1e-12
    assert loss.item() == pytest.approx(0.1 * logs["diffusion"].item(), rel=1e-6)


def test_repkd_compares_each_student_block_with_its_aligned_teacher_block():
    """Student blocks [0, 1] stand for teacher blocks [1, 3]: RepKD is the masked MSE of
    student block j's output against teacher block teacher_layers[j]'s output, on the same
    x_t, t and labels (block outputs caught here by forward hooks)."""
    teacher = randomize_(tiny_model(depth=4), std=0.15, seed=1)
    student = randomize_(tiny_model(depth=2), std=0.15, seed=2)
    outputs: dict[str, dict[int, torch.Tensor]] = {"student": {}, "teacher": {}}
    for name, model in (("student", student), ("teacher", teacher)):
        for i, block in enumerate(model.blocks):
            block.register_forward_hook(lambda m, a, o, name=name, i=i: outputs[name].__setitem__(i, o.detach().clone()))
    from leandit.compress.recovery import repkd_loss

    for layers in ([1, 3], [3, 0]):
        job = RecoveryJob(student, teacher, RecoverySettings(), teacher_layers=layers)
        _, logs = job.compute_loss(student, _batch(), StepRandom(0, 0, 8, 0, 1, torch.device("cpu")))
        expected, dropped = repkd_loss([outputs["student"][0], outputs["student"][1]],
                                       [outputs["teacher"][layers[0]], outputs["teacher"][layers[1]]], 2.0)
        assert logs["repkd"].item() == pytest.approx(expected.item(), rel=1e-6), layers
        assert logs["repkd_dropped"].item() == pytest.approx(dropped.item(), rel=1e-6)
        others, _ = repkd_loss([outputs["student"][0], outputs["student"][1]], [outputs["teacher"][0], outputs["teacher"][1]], 2.0)
        assert abs(others.item() - expected.item()) > 1e-3 * expected.item()  # the alignment matters here


def test_plain_mix_needs_no_teacher_and_bad_mixes_are_refused():
    student = tiny_model(depth=2)
    job = RecoveryJob(student, None, RecoverySettings.from_mix("plain"))
    loss, logs = job.compute_loss(student, _batch(), StepRandom(0, 0, 8, 0, 1, torch.device("cpu")))
    assert loss.item() == pytest.approx(logs["diffusion"].item()) and "kd" not in logs
    with pytest.raises(ValueError, match="need a teacher"):
        RecoveryJob(student, None, RecoverySettings())
    with pytest.raises(ValueError, match="hidden_size"):
        RecoveryJob(student, tiny_model(depth=2, hidden_size=64, num_heads=2), RecoverySettings(), teacher_layers=[0, 1])
    with pytest.raises(ValueError, match="nothing to train"):
        RecoverySettings(kd_weight=0, diffusion_weight=0, repkd_weight=0)


def test_fine_tuning_resumes_to_exactly_the_same_weights(chain, tmp_path):
    def run(out, stop_after=None):
        student, teacher = leandit.load_model(chain / "student"), leandit.load_model(chain / "teacher")
        job = RecoveryJob(student, teacher, RecoverySettings(), teacher_layers=[1, 3])
        config = LoopConfig(steps=6, global_batch_size=16, lr=1e-3, lr_schedule="cosine", final_lr_ratio=0.5,
                            ema_decay=0.9, checkpoint_every=2, log_every=1, precision="fp32")
        return Trainer(config, out, device="cpu", progress=False).fit(job, digits_dataset(), stop_after=stop_after), job

    run(tmp_path / "a")
    run(tmp_path / "b", stop_after=3)
    resumed, _ = run(tmp_path / "b")
    assert resumed.steps == 6
    for name in ("model", "ema"):
        a = load_file(str(tmp_path / "a" / "checkpoints" / "step-0000006" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "b" / "checkpoints" / "step-0000006" / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert logs[0]["repkd_weight"] == pytest.approx(1e-2) and logs[-1]["repkd_weight"] == 0
    assert logs[-1]["lr"] == pytest.approx(5e-4)  # cosine to half


def test_finetune_cli_records_the_recovery_and_a_pruned_model_can_be_pruned_and_distilled_again(chain, tmp_path, capsys):
    out = tmp_path / "d2"
    _main("finetune", str(chain / "student"), "--teacher", str(chain / "teacher"), "--steps", "3", "--out", str(out), *LOOP)
    model = leandit.load_model(out / "model")
    history = json.loads((out / "model" / "compression.json").read_text())
    assert [r["method"] for r in history] == ["indices", "recovery"]
    recovery = history[-1]
    assert recovery["teacher_layers"] == [1, 3] and recovery["loss"]["mix"] == "masked-kd" and recovery["steps"] == 3
    assert recovery["loss"]["repkd_k"] == 2.0 and recovery["ema_decay"] == 0.9
    assert model.config.depth == 2 and (out / "run.json").exists()
    # Iterate: prune the recovered 2-block model to 1 block and distil it from either ancestor.
    _main("prune", str(out / "model"), "--method", "indices", "--indices", "1", "--out", str(tmp_path / "d1"), "--quiet")
    for teacher, expected in ((out / "model", [1]), (chain / "teacher", [3])):
        run_dir = tmp_path / f"d1-from-{teacher.parent.name}"
        _main("finetune", str(tmp_path / "d1" / "model"), "--teacher", str(teacher), "--steps", "2", "--out", str(run_dir), *LOOP)
        assert json.loads((run_dir / "model" / "compression.json").read_text())[-1]["teacher_layers"] == expected
    capsys.readouterr()
    _main("info", str(run_dir / "model"))
    shown = capsys.readouterr().out
    assert "2. recovery (masked-kd, 3 steps)" in shown and "4. recovery (masked-kd, 2 steps)" in shown
    assert "its blocks are blocks [3] of the original model" in shown
    plain = tmp_path / "plain"
    _main("finetune", str(chain / "student"), "--mix", "plain", "--steps", "2", "--out", str(plain), *LOOP)
    record = json.loads((plain / "model" / "compression.json").read_text())[-1]
    assert record["teacher"] is None and record["loss"]["kd_weight"] == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "pass --teacher"),
        (["--teacher", "{sibling}"], "not an ancestor"),
        (["--teacher", "{teacher}", "--teacher-layers", "1"], "one teacher block per student block"),
        (["--teacher", "{teacher}", "--repkd-k", "two"], "--repkd-k takes a number"),
        (["--teacher", "{teacher}", "--mix", "kd", "--teacher-layers", "1,3"], "only when RepKD is on"),
        (["--teacher", "{missing}"], "model not found"),
        (["--teacher", "{teacher}", "--steps", "0"], "--steps must be at least 1"),
        (["--mix", "plain", "--teacher", "{teacher}"], "uses no teacher"),
        (["--teacher", "{teacher}", "--mix", "kd", "--repkd-k", "4"], "--repkd-k applies only when RepKD is on"),
        (["--teacher", "{teacher}", "--class-dropout", "1.5"], "label-dropout probability must be in [0, 1)"),
        (["--teacher", "{teacher}", "--grad-clip", "-1"], "gradient clip must be a positive norm"),
        (["--teacher", "{teacher}", "--final-lr-ratio", "-1"], "final learning-rate ratio"),
        (["--teacher", "{teacher}", "--kd-weight", "nan"], "--kd-weight must be a number >= 0"),
        (["--teacher", "{teacher}", "--repkd-k", "nan"], "--repkd-k must be a positive number"),
        (["--teacher", "{teacher}", "--data", "{missing}"], "{missing}"),
    ],
)
def test_finetune_refuses_bad_input_with_one_line_and_writes_no_model(chain, tmp_path, capsys, extra, message):
    paths = {"sibling": chain / "sibling", "teacher": chain / "teacher", "missing": tmp_path / "nope"}
    extra, message = [e.format(**paths) for e in extra], message.format(**paths)
    out = tmp_path / "run"
    steps = [] if "--steps" in extra else ["--steps", "2"]
    assert main(["finetune", str(chain / "student"), *extra, *steps, "--out", str(out), *LOOP]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (out / "model").exists()


def test_a_resume_with_other_loss_settings_is_refused_and_none_switches_the_mask_off(chain, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["finetune", str(chain / "student"), "--teacher", str(chain / "teacher"), "--steps", "3", "--out", str(out), *LOOP]
    _main(*base, "--stop-after", "1")
    assert main([*base, "--repkd-k", "4"]) == 2
    assert "other recovery settings (repkd_k)" in capsys.readouterr().err
    _main(*base)  # the same options resume
    plain = tmp_path / "no-mask"
    _main("finetune", str(chain / "student"), "--teacher", str(chain / "teacher"), "--repkd-k", "none", "--steps", "1",
          "--out", str(plain), *LOOP)
    record = json.loads((plain / "model" / "compression.json").read_text())[-1]
    assert record["loss"]["repkd_k"] is None and record["alignment"] == "segment"
    assert json.loads((plain / "metrics.jsonl").read_text().splitlines()[0])["repkd_dropped"] == 0


def test_a_bf16_teacher_under_autocast_distils_without_gradients_or_changes():
    teacher = randomize_(tiny_model(depth=4), std=0.15, seed=1)
    student = randomize_(tiny_model(depth=2), std=0.15, seed=2)
    job = RecoveryJob(student, teacher, RecoverySettings(), teacher_layers=[1, 3], teacher_dtype=torch.bfloat16)
    job.setup(torch.device("cpu"))
    assert all(p.dtype == torch.bfloat16 for p in teacher.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs = job.compute_loss(student, _batch(), StepRandom(0, 0, 8, 0, 1, torch.device("cpu")))
    loss.backward()
    assert torch.isfinite(loss) and logs["kd"].dtype == torch.float32 and logs["repkd"].dtype == torch.float32
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in student.parameters())


def test_data_that_does_not_fit_the_model_is_refused_with_the_fix(tmp_path, capsys):
    leandit.save_model(tiny_model(depth=2, in_channels=4, space="latent"), tmp_path / "latent")
    assert main(["analyze", "activations", str(tmp_path / "latent"), "--out", str(tmp_path / "a")]) == 2
    assert "pass --data with a folder of latent shards" in capsys.readouterr().err
    assert main(["finetune", str(tmp_path / "latent"), "--mix", "plain", "--steps", "1", "--out", str(tmp_path / "f"), *LOOP]) == 2
    assert "pass --data with a folder of latent shards" in capsys.readouterr().err


def test_analyze_activations_writes_the_histograms_and_statistics_of_every_block(chain, tmp_path):
    out = tmp_path / "act"
    done = run_cli("analyze", "activations", str(chain / "teacher"), "--out", str(out), "--calibration-size", "32", "--k", "2,4")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "activations.png").stat().st_size > 5000
    rows = list(csv.DictReader(open(out / "activations.csv")))
    assert [int(r["block"]) for r in rows] == [0, 1, 2, 3]
    # Independent: every block output over the same calibration set, by hooks.
    model = leandit.load_model(chain / "teacher")
    calibration = make_calibration_set(model, digits_dataset(), 32, 0)
    outputs = {}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, a, o, i=i: outputs.setdefault(i, []).append(o.detach().double()))
    with torch.no_grad():
        for xt, t, y, _ in calibration.batches(64, torch.device("cpu")):
            model(xt, t, y)
    for i, row in enumerate(rows):
        x = torch.cat(outputs[i])
        assert float(row["max"]) == pytest.approx(x.max().item(), rel=1e-5)
        assert float(row["min"]) == pytest.approx(x.min().item(), rel=1e-5)
        assert float(row["std"]) == pytest.approx(x.std(correction=0).item(), rel=1e-4)
        flat = x.flatten(1)
        sigma = (flat - flat.mean(1, keepdim=True)).abs() / flat.std(1, correction=0, keepdim=True)
        assert float(row["beyond_2_sigma"]) == pytest.approx((sigma > 2).double().mean().item(), rel=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["k"] == [2.0, 4.0] and len(summary["blocks"]) == 4
    bad = run_cli("analyze", "activations", str(chain / "teacher"), "--out", str(tmp_path / "x"), "--k", "0")
    assert bad.returncode == 2 and "--k needs positive thresholds" in bad.stderr

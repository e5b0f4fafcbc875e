"""The loop's speed options keep results exact: no host read per step, the NaN guard's skip
on the device, torch.compile resumable, bf16 on CPUs, and one-line errors for options a device
cannot use."""

from __future__ import annotations

import copy

import numpy as np

import pytest
import torch
import torch.nn.functional as F

from leandit.compress.recovery.job import RecoveryJob, RecoverySettings
from leandit.devices import check_compile, check_cuda_graphs, resolve_precision
from leandit.diffusion import GaussianDiffusion
from leandit.models.attention import attention
from leandit.models.blocks import keep_blocks
from leandit.train import EMA, Trainer
from leandit.train.checkpoint import latest_checkpoint
from leandit.train.loop import TrainingJob

from conftest import tiny_model
from test_train_loop import PoisonedJob, assert_same, loop_config, make_job, state, toy_data


def test_no_number_is_read_back_to_the_host_between_log_steps(tmp_path, monkeypatch):
    """A GPU only runs ahead of the host if nothing waits for a result: the reads a run makes
    are the same for 3 and for 9 steps between the same log and checkpoint steps."""
    reads = {"n": 0}
    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            reads["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def run(steps: int) -> int:
        reads["n"] = 0
        cfg = loop_config(steps=steps, log_every=steps, checkpoint_every=steps, warmup_steps=0)
        Trainer(cfg, tmp_path / f"run{steps}", device="cpu", progress=False).fit(make_job(), toy_data(256))  # one epoch
        return reads["n"]

    assert run(3) == run(9)


def test_a_skipped_step_leaves_the_optimizer_state_as_it_was(tmp_path):
    job = PoisonedJob(tiny_model(), GaussianDiffusion.dit(), bad_steps={1, 2})
    result = Trainer(loop_config(steps=4, checkpoint_every=4), tmp_path, device="cpu", progress=False).fit(job, toy_data())
    assert result.skipped_steps == 2
    saved = torch.load(latest_checkpoint(tmp_path) / "training_state.pt", weights_only=False)
    steps = {float(s["step"]) for s in saved["optimizer"]["state"].values()}
    assert steps == {2.0}  # AdamW's bias correction counts the applied steps only
    assert saved["ema"]["updates"] == 2


def test_an_ema_update_that_was_not_applied_changes_nothing():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.5, warmup=True)
    before = state(ema.shadow)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, torch.tensor(False))
    assert_same(before, state(ema.shadow))
    assert ema.updates == 0
    ema.update(model, torch.tensor(True))
    decay = min(0.5, 1 / 10)  # the warm-up decay of the first applied update
    expected = decay * before["weight"] + (1 - decay) * model.weight.detach()
    torch.testing.assert_close(ema.shadow.weight, expected)
    assert ema.updates == 1


def test_a_compiled_run_resumes_exactly_and_matches_eager(tmp_path):
    def run(folder, compile_: bool, stop_after=None):
        cfg = loop_config(steps=4, checkpoint_every=2, compile=compile_, compile_backend="aot_eager")
        job = make_job()
        Trainer(cfg, tmp_path / folder, device="cpu", progress=False).fit(job, toy_data(), stop_after=stop_after)
        return job

    whole = run("whole", True)
    run("parts", True, stop_after=2)
    resumed = run("parts", True)
    assert_same(state(whole.module), state(resumed.module))
    eager = run("eager", False)
    for key, value in state(eager.module).items():
        torch.testing.assert_close(state(whole.module)[key], value, rtol=1e-4, atol=1e-5)
    assert "_orig_mod" not in "".join(state(whole.module))  # the module itself is not wrapped


def test_compile_compiles_the_teacher_in_place():
    torch.manual_seed(0)
    teacher = tiny_model(depth=4)
    job = RecoveryJob(keep_blocks(teacher, [1, 3]), copy.deepcopy(teacher), RecoverySettings(), teacher_layers=[1, 3])
    names = list(job.teacher.state_dict())
    job.prepare_compile("aot_eager")
    assert job.teacher._compiled_call_impl is not None and list(job.teacher.state_dict()) == names
    assert TrainingJob.prepare_compile(job, "aot_eager") is None  # the default has nothing to compile


def test_bf16_attention_on_a_cpu_runs_in_float32_and_returns_bf16():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=gen) for _ in range(3))
    assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))  # float32: untouched
    half = [x.bfloat16().requires_grad_() for x in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(*half)
    assert out.dtype == torch.bfloat16
    exact = F.scaled_dot_product_attention(*(x.detach().float() for x in half))
    assert torch.equal(out, exact.bfloat16())
    out.float().sum().backward()
    assert all(x.grad is not None and x.grad.dtype == torch.bfloat16 for x in half)


def test_a_bf16_run_on_a_cpu_trains_and_resumes_exactly(tmp_path):
    def run(folder, stop_after=None):
        job = make_job()
        Trainer(loop_config(steps=4, checkpoint_every=2, precision="bf16"), tmp_path / folder, device="cpu",
                progress=False).fit(job, toy_data(), stop_after=stop_after)
        return job

    whole = run("whole")
    run("parts", stop_after=2)
    assert_same(state(whole.module), state(run("parts").module))


def test_options_a_device_cannot_use_are_one_line_errors(monkeypatch):
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        check_cuda_graphs(torch.device("cpu"))
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(ValueError, match="needs a C\\+\\+ compiler") as error:
        check_compile(torch.device("cpu"))
    assert "\n" not in str(error.value)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    with pytest.raises(ValueError, match="Tesla V100 has no bf16 support: use --precision fp32"):
        resolve_precision("bf16", torch.device("cuda"))
    assert resolve_precision("auto", torch.device("cuda")) == "fp32"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"


def _one_line_error(argv: list[str], capsys) -> str:
    from leandit.cli import main

    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


def test_the_commands_refuse_speed_options_this_machine_cannot_use(tmp_path, capsys, monkeypatch):
    import leandit

    folder = tmp_path / "m"
    leandit.save_model(tiny_model(), folder)
    sample = ["sample", str(folder), "--out", str(tmp_path / "s"), "--device", "cpu", "--quiet"]
    assert "--cuda-graphs needs a CUDA GPU" in _one_line_error([*sample, "--cuda-graphs"], capsys)
    assert "--cuda-graphs needs a CUDA GPU" in _one_line_error(["bench", str(folder), "--cuda-graphs", "--device", "cpu"], capsys)
    monkeypatch.setattr("shutil.which", lambda name: None)  # a machine without a C++ compiler
    assert "needs a C++ compiler" in _one_line_error([*sample, "--compile"], capsys)
    train = ["train", "--model", "DiT-S/2", "--set", "input_size=8", "--set", "in_channels=1", "--set", "hidden_size=32",
             "--set", "num_heads=2", "--set", "depth=2", "--set", "num_classes=10", "--set", "space=\"pixel\"",
             "--data", "digits", "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "t"), "--quiet", "--compile"]
    assert "needs a C++ compiler" in _one_line_error(train, capsys)
    assert not (tmp_path / "s").exists() and not (tmp_path / "t" / "checkpoints").exists()


def test_bf16_sampling_is_recorded_and_a_rerun_in_fp32_is_refused(tmp_path, capsys):
    import json

    import leandit
    from leandit.cli import main

    torch.manual_seed(0)
    folder = tmp_path / "m"
    leandit.save_model(tiny_model(), folder)
    out = tmp_path / "s"
    base = ["sample", str(folder), "--out", str(out), "--device", "cpu", "--quiet", "--num-samples", "4", "--steps", "3"]
    assert main([*base, "--precision", "bf16"]) == 0
    assert json.loads((out / "sampling.json").read_text())["precision"] == "bf16"
    bf16 = np.load(out / "samples.npz")["arr_0"]
    capsys.readouterr()
    assert "--precision was 'bf16', now None" in _one_line_error(base, capsys)
    assert main([*base, "--out", str(tmp_path / "fp32")]) == 0
    fp32 = np.load(tmp_path / "fp32" / "samples.npz")["arr_0"]
    assert "precision" not in json.loads((tmp_path / "fp32" / "sampling.json").read_text())
    # The same images up to bf16 rounding: uint8 pixels within a few levels.
    assert np.abs(bf16.astype(int) - fp32.astype(int)).mean() < 8


def test_a_compiled_model_samples_what_the_eager_one_does_and_bench_times_it(tmp_path):
    from leandit.devices import compile_for_sampling
    from leandit.evaluate.speed import measure_speed

    torch.manual_seed(0)
    model = tiny_model().eval()
    gen = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(2, 1, 8, 8, generator=gen), torch.tensor([10, 500]), torch.tensor([1, 2])
    with torch.inference_mode():
        eager = model(x, t, y)
    rows = measure_speed([("compiled", model)], batch_size=2, cfg_scale=1.0, warmup=0, rounds=2, compile=True)
    assert rows[0].latency_ms > 0 and rows[0].flops_per_step > 0
    assert model._compiled_call_impl is not None  # compiled in place: the same module
    with torch.inference_mode():
        torch.testing.assert_close(model(x, t, y), eager, rtol=1e-4, atol=1e-5)
    compile_for_sampling(model, torch.device("cpu"))  # again: still one module, no wrapper
    assert "_orig_mod" not in "".join(model.state_dict())


def test_compile_turns_the_automatic_skip_off_and_keeps_an_asked_one():
    from leandit.compress.depth import LearnablePruningJob, LearnableSettings

    for choice, expected in (("auto", False), ("on", True)):
        job = LearnablePruningJob(tiny_model(depth=4), LearnableSettings(scheme="1:2", skip_dropped_backward=choice))
        job.setup(torch.device("cpu"))
        assert job.module.skip_dropped  # both on for a CPU
        job.prepare_compile("aot_eager")  # the per-block splits would recompile every step
        assert job.module.skip_dropped is expected

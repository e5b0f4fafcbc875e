"""What a new user ran into (issue 19): never destroy a user's files, reruns that recover from
mistakes, options that are checked, output a person reads. Each test made the bug visible."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

import leandit
from leandit.cli import main
from conftest import randomize_, tiny_model
from test_cli import tiny_train_args

SAMPLE = ["--steps", "2", "--num-samples", "4", "--part-size", "2", "--grid", "4", "--device", "cpu", "--quiet"]


def error_of(argv: list[str], capsys) -> str:
    """The one-line error of a command that must fail with status 2."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny"
    leandit.save_model(randomize_(tiny_model(depth=4), std=0.15), folder)
    return folder


# -- 1. data safety -----------------------------------------------------------------------

def test_save_model_keeps_a_users_files(tmp_path):
    model = tiny_model()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    with pytest.raises(FileExistsError, match="not a model folder.*notes.txt.*overwrite=True"):
        leandit.save_model(model, mine)
    assert (mine / "notes.txt").read_text() == "my notes"
    a_file = tmp_path / "a-file"
    a_file.write_text("data")
    with pytest.raises(FileExistsError, match="not a folder"):
        leandit.save_model(model, a_file)
    assert a_file.read_text() == "data"
    # A model folder with a user's file in it is not replaced either.
    folder = leandit.save_model(model, tmp_path / "model")
    (folder / "notes.txt").write_text("about this model")
    with pytest.raises(FileExistsError, match="not the model's.*notes.txt"):
        leandit.save_model(model, folder)
    # A diffusers pipeline folder holds more than the transformer: never replaced whole.
    pipeline = tmp_path / "pipeline"
    (pipeline / "vae").mkdir(parents=True)
    (pipeline / "model_index.json").write_text("{}")
    leandit.save_model(model, pipeline / "transformer")
    with pytest.raises(FileExistsError):
        leandit.save_model(model, pipeline)
    assert (pipeline / "vae").is_dir()


def test_save_model_replaces_its_own_folders_and_overwrite_replaces_anything(tmp_path):
    folder = leandit.save_model(tiny_model(depth=2), tmp_path / "model")
    leandit.save_model(tiny_model(depth=3), folder)  # leandit's own folder: replaced
    assert leandit.load_model(folder).config.depth == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    leandit.save_model(tiny_model(), empty)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    leandit.save_model(tiny_model(), mine, overwrite=True)
    assert not (mine / "notes.txt").exists() and leandit.load_model(mine).config.depth == 2


def test_prune_out_keeps_another_methods_result_and_a_users_files(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", str(model_dir), "--method", "oracle", "--keep", "2", "--out", str(out), "--quiet"]) == 0
    kept = json.loads((out / "decision.json").read_text())["kept_indices"]
    # the same method again replaces its own result
    assert main(["prune", str(model_dir), "--method", "oracle", "--keep", "3", "--out", str(out), "--quiet"]) == 0
    err = error_of(["prune", str(model_dir), "--method", "indices", "--indices", "0,1", "--out", str(out)], capsys)
    assert "holds the result of `leandit prune --method oracle`" in err and "--overwrite" in err
    assert len(json.loads((out / "decision.json").read_text())["kept_indices"]) == 3 != len(kept)
    assert main(["prune", str(model_dir), "--method", "indices", "--indices", "0,1", "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert json.loads((out / "decision.json").read_text())["kept_indices"] == [0, 1]
    # a folder of the user's: refused, and --overwrite keeps the user's own files
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    err = error_of(["prune", str(model_dir), "--method", "oracle", "--keep", "2", "--out", str(mine)], capsys)
    assert "holds files leandit did not write (notes.txt)" in err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert main(["prune", str(model_dir), "--method", "oracle", "--keep", "2", "--out", str(mine), "--overwrite", "--quiet"]) == 0
    assert (mine / "notes.txt").read_text() == "my notes" and (mine / "model").is_dir()
    # another command into a prune folder
    err = error_of(["train", "--model", "DiT-S/2", "--set", "input_size=8", "--set", "in_channels=1", "--set", "space=pixel",
                    "--set", "num_classes=10", "--data", "digits", "--steps", "1", "--out", str(out)], capsys)
    assert "holds the result of `leandit prune --method indices`, not of `leandit train`" in err


@pytest.fixture
def umask_022(monkeypatch):
    """Files written under the usual umask 022 (the modes are read once, at import)."""
    from leandit import files

    old = os.umask(0o022)
    os.umask(0o022)
    monkeypatch.setattr(files, "UMASK", files._read_umask())
    monkeypatch.setattr(files, "FILE_MODE", 0o666 & ~files.UMASK)
    monkeypatch.setattr(files, "FOLDER_MODE", 0o777 & ~files.UMASK)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_every_output_is_readable_by_colleagues_under_umask_022(umask_022, model_dir, tmp_path):
    s = tmp_path / "s"
    assert main(["sample", "digits-teacher", "--out", str(s), *SAMPLE]) == 0
    outputs = [s / "samples.npz", s / "sampling.json", s / "grid.png", *sorted((s / "parts").iterdir())]
    assert len(outputs) == 5
    metrics = tmp_path / "metrics.json"
    metrics.write_text("{}")
    os.chmod(metrics, 0o644)  # an earlier result the user shares: stays shared when overwritten
    assert main(["eval", str(s / "samples.npz"), "--ref", "digits", "--out", str(metrics), "--device", "cpu", "--quiet"]) == 0
    assert main(["bench", str(model_dir), "--batch-size", "1", "--warmup", "0", "--rounds", "1", "--sampling-steps", "1",
                 "--no-memory", "--device", "cpu", "--out", str(tmp_path / "b.md"), "--json", str(tmp_path / "b.json")]) == 0
    assert main(tiny_train_args(tmp_path / "run", 1)) == 0
    outputs += [metrics, tmp_path / "b.md", tmp_path / "b.json", tmp_path / "run" / "run.json",
                *sorted((tmp_path / "run" / "model").iterdir())]
    modes = {str(p.relative_to(tmp_path)): oct(_mode(p)) for p in outputs}
    assert set(modes.values()) == {"0o644"}, modes
    assert _mode(s / "parts") == _mode(tmp_path / "run" / "model") == 0o755


# -- 3. reruns ------------------------------------------------------------------------------

def test_a_failed_sample_writes_nothing_and_the_corrected_command_runs(tmp_path, capsys):
    s = tmp_path / "s"
    for bad, message in ((["--steps", "0"], "--steps must be at least 1"),
                         (["--steps", "2000"], "--steps must be at most 1000")):
        assert message in error_of(["sample", "digits-teacher", "--out", str(s), *SAMPLE, *bad], capsys)
        assert not s.exists()
    assert main(["sample", "digits-teacher", "--out", str(s), *SAMPLE]) == 0
    # The defaults given explicitly are the same settings: the rerun reuses every part.
    assert main(["sample", "digits-teacher", "--out", str(s), *SAMPLE, "--sampler", "ddim", "--guided-channels", "1"]) == 0
    err = error_of(["sample", "digits-teacher", "--out", str(s), *SAMPLE, "--num-samples", "6"], capsys)
    assert "other settings (--num-samples was 4, now 6)" in err


def test_the_settings_file_is_written_with_the_first_part(tmp_path):
    from leandit.evaluate.sample_run import PartPlan, make_parts

    def broken(indices):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        make_parts(PartPlan(4, 2), tmp_path, 0, 1, broken, np.zeros(4), before_write=lambda: (tmp_path / "sampling.json").write_text("{}"))
    assert not (tmp_path / "sampling.json").exists()


# -- 6. options that are checked -----------------------------------------------------------

def test_options_that_do_not_fit_are_one_line_errors(model_dir, tmp_path, capsys):
    s = str(tmp_path / "s")
    cases = [
        (["sample", "digits-teacher", "--out", s, *SAMPLE, "--eta", "-1"], "--eta must be 0"),
        (["sample", "digits-teacher", "--out", s, *SAMPLE, "--eta", "0.5", "--sampler", "ddpm"], "--eta applies to --sampler ddim"),
        (["sample", "digits-teacher", "--out", s, *SAMPLE, "--guided-channels", "5"], "--guided-channels must be between 1 and the model's 1"),
        (["sample", "digits-teacher", "--out", s, *SAMPLE, "--vae", str(tmp_path)], "--vae applies to latent-space models"),
        (["sample", "digits-teacher", "--out", s, *SAMPLE, "--grid", "-1"], "--grid must be 0"),
        (["prune", str(model_dir), "--method", "learnable", "--scheme", "1:2", "--steps", "1", "--random-pick", "min-loss",
          "--out", s], "--random-pick applies to --method random"),
        (["prune", str(model_dir), "--method", "oracle", "--keep", "4", "--out", s], "--keep 4: the model has 4 blocks"),
        (["demo", "--redo", "foo", "--out", s], "--redo foo: no such stage; the stages are teacher, sample-teacher, prune-learnable"),
    ]
    for argv, message in cases:
        assert message in error_of(argv, capsys), argv
    assert not (tmp_path / "s").exists()
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert "is a file: pass a folder" in error_of(["demo", "--out", str(a_file)], capsys)


def test_a_warm_up_longer_than_the_run_is_a_warning(tmp_path, capsys):
    assert main(tiny_train_args(tmp_path / "run", 1, "--warmup-steps", "5")) == 0
    assert "warning: --warmup-steps 5 is not shorter than the run (1 step)" in capsys.readouterr().err


# -- 7, 11. the command itself ------------------------------------------------------------

def test_version_and_a_help_that_imports_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys\nfrom leandit.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'numpy', 'diffusers', 'matplotlib') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in done.stdout and "prune" in done.stdout, done.stdout + done.stderr
    done = subprocess.run([sys.executable, "-m", "leandit.cli", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"leandit {leandit.__version__}"


def test_python_dash_m_leandit_is_the_leandit_command():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "leandit", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"leandit {leandit.__version__}", done.stderr
    done = subprocess.run([sys.executable, "-m", "leandit", "info", "DiT-S/2:depth=2"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "2 blocks" in done.stdout, done.stderr
    done = subprocess.run([sys.executable, "-m", "leandit", "info", "no-such-model"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("leandit info: error:"), done.stderr  # the exit status passes through


def test_the_quick_help_says_what_each_command_says():
    from leandit import cli

    parser = cli.build_parser()
    choices = next(a for a in parser._actions if a.dest == "command")._choices_actions
    assert {a.dest: a.help for a in choices} == {name: cli.SUMMARIES[name] for name in cli.COMMANDS}


def test_a_reader_that_stops_early_is_no_error():
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "leandit.cli", "info", "digits-teacher"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # `| head` that has read enough
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and err == "", err


def test_inputs_and_outputs_are_checked_before_the_work_in_the_users_words(model_dir, tmp_path, capsys):
    npy = tmp_path / "samples.npy"
    np.save(npy, np.zeros((4, 8, 8, 1), np.uint8))
    assert "SAMPLES" in (err := error_of(["eval", str(npy), "--ref", "digits"], capsys)) and "numpy.savez" in err
    # the curve's file type is refused before any variant is timed
    err = error_of(["bench", "DiT-XL/2", "--curve", str(tmp_path / "c.txt"), "--device", "cpu"], capsys)
    assert "ending in .png" in err
    text = tmp_path / "data.txt"
    text.write_text("not data")
    assert f"--data {text} is a file" in error_of(["prune", str(model_dir), "--method", "shortgpt", "--keep", "2",
                                                     "--data", str(text), "--out", str(tmp_path / "p")], capsys)
    assert not (tmp_path / "p").exists()


def test_results_to_stdout_warnings_and_units_a_person_reads(model_dir, tmp_path, capsys):
    assert main(["analyze", "calibration", str(model_dir), "--keep", "2", "--samples", "4", "--baselines", "oracle",
                 "--calibration-size", "8", "--out", str(tmp_path / "a"), "--quiet", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "random masks: min" in captured.out and "oracle" in captured.out and "random masks: min" not in captured.err
    s = tmp_path / "s"
    assert main(["sample", "digits-teacher", "--out", str(s), *SAMPLE, "--part-size", "8"]) == 0
    err = capsys.readouterr().err
    assert "4 samples (1 part," in err and " s on " in err
    assert main(["eval", str(s / "samples.npz"), "--ref", "digits", "--device", "cpu", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "warning: 4 samples: FID is biased upwards below about 1,000" in captured.err
    assert 0 <= json.loads(captured.out)["class_agreement"] <= 1  # as the demo reports it
    assert main(["bench", str(model_dir), "--batch-size", "1", "--warmup", "1", "--rounds", "1", "--sampling-steps", "1",
                 "--no-memory", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "measuring 1 model at batch 1" in captured.err and "1 warm-up step, 1 interleaved round" in captured.err
    row = captured.out.splitlines()[2]
    assert " k | " in row and " M | " in row and "| 0.0 |" not in row, row  # tens of thousands of parameters, MFLOPs
    assert main(["info", str(model_dir)]) == 0
    assert "MFLOPs per forward" in capsys.readouterr().out


def test_help_texts_a_newcomer_needs():
    from leandit.cli import build_parser
    from leandit.compress.depth import METHODS

    parser = build_parser(["prune", "train", "demo"])
    sub = next(a for a in parser._actions if a.dest == "command").choices
    method = next(a for a in sub["prune"]._actions if a.dest == "method")
    assert all(f"{name} = " in method.help for name in METHODS), method.help
    data = next(a for a in sub["train"]._actions if a.dest == "data")
    assert "no default" in data.help
    redo = next(a for a in sub["demo"]._actions if a.dest == "redo")
    assert "prune-shortgpt" in redo.help and "speed" in redo.help
    first = leandit.DiT.forward_with_cfg.__doc__.splitlines()[0]
    assert "ONCE" in first and "original DiT" in first and "doubled" in first


def test_a_damaged_checkpoint_says_what_is_wrong_in_words(tmp_path, capsys):
    import torch

    good = tmp_path / "DiT-good.pt"
    torch.save(tiny_model().state_dict(), good)
    junk, empty, cut = tmp_path / "DiT-junk.pt", tmp_path / "DiT-empty.pt", tmp_path / "DiT-cut.pt"
    junk.write_bytes(b"hello world" * 10)  # torch says "(101)"
    empty.write_bytes(b"")
    cut.write_bytes(good.read_bytes()[:1000])
    assert "is not a checkpoint (it is neither torch.save's zip format nor a pickle)" in error_of(["info", str(junk)], capsys)
    assert "(101)" not in error_of(["info", str(junk)], capsys)
    assert "the file is empty (0 bytes)" in error_of(["info", str(empty)], capsys)
    assert "the file is damaged or incomplete (1,000 bytes" in error_of(["info", str(cut)], capsys)
    assert "use --weights auto" in error_of(["info", str(good), "--weights", "ema", "--num-heads", "2"], capsys)


# -- 4. resumes with a changed setup -------------------------------------------------------

def test_a_resume_with_another_setup_says_what_differs(model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(tiny_train_args(run, 4, "--stop-after", "1")) == 0
    err = error_of(tiny_train_args(run, 4, "--set", "depth=3"), capsys)
    assert f"cannot resume {run}: its checkpoints were made with model depth=2 (now 3)" in err
    assert "use the same options to continue it, or a new --out" in err
    pruned = tmp_path / "pruned"
    learn = ["prune", str(model_dir), "--method", "learnable", "--steps", "4", "--batch-size", "8", "--device", "cpu",
             "--precision", "fp32", "--checkpoint-every", "1", "--quiet", "--out", str(pruned)]
    assert main([*learn, "--scheme", "1:2", "--stop-after", "1"]) == 0
    err = error_of([*learn, "--scheme", "2:4"], capsys)
    assert "its checkpoints were made with --scheme 1:2 (now 2:4)" in err
    assert main([*learn, "--scheme", "1:2"]) == 0  # the same options continue it


def test_a_run_started_before_a_config_field_existed_still_resumes(tmp_path):
    """run.json of an older leandit lacks fields added since (time_freq_shift, mlp_norm_eps):
    the run used their defaults, which is no difference."""
    run = tmp_path / "run"
    assert main(tiny_train_args(run, 4, "--stop-after", "1")) == 0
    record = json.loads((run / "run.json").read_text())
    for field in ("time_freq_shift", "mlp_norm_eps"):
        del record["model_config"][field]
    (run / "run.json").write_text(json.dumps(record))
    assert main(tiny_train_args(run, 4)) == 0


# -- 5. the fit of model and data ---------------------------------------------------------

def test_the_whole_misfit_of_model_and_data_in_one_message(tmp_path, capsys):
    err = error_of(["train", "--model", "DiT-S/2", "--data", "digits", "--steps", "1", "--out", str(tmp_path / "x")], capsys)
    assert "is in pixel space but the model is set up for latent space; has items of shape (1, 8, 8)" in err
    assert "has 10 classes but the model has 1000" in err
    assert "--set space=pixel --set in_channels=1 --set input_size=8 --set num_classes=10" in err
    fixed = ["--set", "space=pixel", "--set", "in_channels=1", "--set", "input_size=8", "--set", "num_classes=10",
             "--set", "depth=1", "--set", "hidden_size=32", "--set", "num_heads=2"]
    assert main(["train", "--model", "DiT-S/2", *fixed, "--data", "digits", "--steps", "1", "--batch-size", "8",
                 "--device", "cpu", "--quiet", "--out", str(tmp_path / "x")]) == 0


# -- 9. plots a person can read -------------------------------------------------------------

@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions make, kept open to look at."""
    from leandit.evaluate import plots

    made = []
    monkeypatch.setattr(plots, "_save", lambda fig, out: made.append(fig) or out)
    return made


def test_plots_show_whole_numbers_every_band_and_every_method(figures, tmp_path):
    from types import SimpleNamespace

    from leandit.evaluate import plots

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "keep_prob/00": 0.5, "keep_prob/01": 0.5}) + "\n" for s in range(1, 4)))
    plots.plot_decisions(metrics, tmp_path / "d.png", kept=[0])
    ticks = figures[-1].axes[0].get_xticks()
    assert len(ticks) and all(float(t).is_integer() for t in ticks), ticks
    plots.plot_calibration_histogram([0.1, 0.2, 0.2, 0.3], {"shortgpt": 0.15, "sensitivity": 0.15, "oracle": 0.3}, tmp_path / "c.png")
    ax = figures[-1].axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert any("shortgpt" in l and "sensitivity" in l for l in labels), labels  # not one hidden behind the other
    assert all(float(t).is_integer() for t in ax.get_yticks())
    edges = np.linspace(-40, 40, 11)
    layer = SimpleNamespace(layer=0, edges=edges, counts=np.ones(10), mean=0.0, std=1.0, max=40.0, min=-40.0)
    plots.plot_activation_histograms([layer], tmp_path / "a.png", k=[2, 4])
    ax = figures[-1].axes[0]
    assert len(ax.lines) == 4 and ax.get_xlabel() and ax.get_ylabel()  # both bands, both axes named
    assert "2 std" in figures[-1]._suptitle.get_text() and "4 std" in figures[-1]._suptitle.get_text()


def test_the_curve_title_names_the_model_short(tmp_path):
    from leandit.commands.bench import short_name

    folder = tmp_path / "a" / "very" / "long" / "path" / "DiT-XL-2-256x256.pt"
    folder.parent.mkdir(parents=True)
    folder.write_bytes(b"")
    assert short_name(str(folder)) == "DiT-XL-2-256x256.pt" and short_name("DiT-XL/2:depth=14") == "DiT-XL/2:depth=14"


def test_a_sample_grid_labels_its_columns(tmp_path):
    from PIL import Image

    from leandit.evaluate.sampling import save_grid

    images = np.full((4, 8, 8, 1), 255, np.uint8)  # white images: only the labels are dark
    plain = np.asarray(Image.open(save_grid(tmp_path / "a.png", images, ncols=2)))
    labelled = np.asarray(Image.open(save_grid(tmp_path / "b.png", images, ncols=2, column_labels=["3", "7"])))
    assert plain.min() == 255 and labelled.shape[0] > plain.shape[0]
    strip = labelled[: labelled.shape[0] - plain.shape[0]]
    assert strip[:, : strip.shape[1] // 2].min() < 128 and strip[:, strip.shape[1] // 2 :].min() < 128  # a label on each column


# -- 8. one way to name a model --------------------------------------------------------------

def test_a_named_size_with_overrides_and_a_shipped_name_work_everywhere(tmp_path, capsys):
    assert main(["info", "DiT-XL/2:depth=14"]) == 0
    assert "14 blocks" in capsys.readouterr().out
    assert main(["info", "digits-teacher"]) == 0
    assert "12 blocks" in capsys.readouterr().out
    assert leandit.build_model("DiT-S/2:depth=3,num_classes=10").config.depth == 3
    assert leandit.load_model("digits-teacher").config.depth == 12
    fitting = "DiT-S/2:input_size=8,in_channels=1,space=pixel,num_classes=10,depth=1,hidden_size=32,num_heads=2"
    assert main(["train", "--model", fitting, "--data", "digits", "--steps", "1", "--batch-size", "8", "--device", "cpu",
                 "--quiet", "--out", str(tmp_path / "run")]) == 0
    assert leandit.load_model(tmp_path / "run" / "model").config.depth == 1


def test_loading_a_named_size_says_it_has_no_weights_and_what_to_do(tmp_path, capsys):
    for name in ("DiT-XL/2", "DiT-S/2:depth=3"):
        with pytest.raises(ValueError) as raised:
            leandit.load_model(name)
        message = str(raised.value)
        assert len(message.splitlines()) == 1 and "not found" not in message, message
        assert f"{name!r} is a named size with no weights" in message and f"leandit.build_model({name!r})" in message
        assert "checkpoint file or a model folder" in message
    with pytest.raises(FileNotFoundError, match="model not found"):  # any other missing name is still not found
        leandit.load_model(tmp_path / "DiT-XL-2.pt")
    assert main(["info", "DiT-XL/2"]) == 0  # the command line keeps building named sizes
    assert "28 blocks" in capsys.readouterr().out


def test_an_older_prune_folder_without_a_marker_is_known_by_its_decision(model_dir, tmp_path, capsys):
    """An --out an older leandit wrote (model/ and decision.json, no leandit-run.json): its method
    is read from decision.json, so another method's result is not silently replaced."""
    old = tmp_path / "old"
    leandit.save_model(tiny_model(depth=2), old / "model")
    decision = {"source": str(model_dir), "method": "random-min-loss", "scheme": "2:4", "source_depth": 4,
                "kept_indices": [0, 3], "removed_indices": [1, 2]}
    (old / "decision.json").write_text(json.dumps(decision, indent=2) + "\n")
    err = error_of(["prune", str(model_dir), "--method", "oracle", "--keep", "2", "--out", str(old)], capsys)
    assert "holds the result of `leandit prune --method random`, not of `leandit prune --method oracle`" in err
    assert "--overwrite" in err
    err = error_of(["train", "--model", "DiT-S/2", "--data", "digits", "--steps", "1", "--out", str(old)], capsys)
    assert "holds the result of `leandit prune --method random`, not of `leandit train`" in err
    assert json.loads((old / "decision.json").read_text()) == decision and not (old / "leandit-run.json").exists()
    # the same method reruns in place and marks the folder as a current leandit would
    assert main(["prune", str(model_dir), "--method", "random", "--keep", "2", "--out", str(old), "--quiet"]) == 0
    assert json.loads((old / "leandit-run.json").read_text()) == {"command": "prune", "method": "random"}
    # --overwrite replaces it with another method's result
    (old / "leandit-run.json").unlink()
    assert main(["prune", str(model_dir), "--method", "oracle", "--keep", "2", "--out", str(old), "--overwrite", "--quiet"]) == 0
    assert json.loads((old / "decision.json").read_text())["method"] == "oracle"
    # a decision.json that names no method: an older run folder of unknown kind, as before
    (old / "leandit-run.json").unlink()
    (old / "decision.json").write_text("{}\n")
    assert main(["prune", str(model_dir), "--method", "indices", "--indices", "0,1", "--out", str(old), "--quiet"]) == 0

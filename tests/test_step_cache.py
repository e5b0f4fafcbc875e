"""Training-free step caching: interval 1 is the model exactly, cached calls skip every block
and add the stored updates, the schedule restarts with each trajectory, and the cache
composes with depth-pruned, DyDiT and DiffCR models."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import leandit
from leandit.backbones import backbone
from leandit.compress.dynamic import DynamicModel
from leandit.compress.routing import RoutedModel
from leandit.compress.step_cache import CacheSettings, StepCache
from leandit.evaluate.sampling import generate
from leandit.evaluate.speed import measure_speed
from leandit.models.blocks import block_list, keep_blocks

from conftest import randomize_, tiny_model


def dense(depth: int = 4) -> leandit.DiT:
    return randomize_(tiny_model(depth=depth), std=0.2, seed=0).eval()


def routed(depth: int = 4) -> RoutedModel:
    model = RoutedModel(dense(depth)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.routed_blocks:
            block.router.weight.copy_(torch.randn(block.router.weight.shape, generator=gen))
        model.ratios.fill_(0.5)
    model.freeze()
    return model


def models() -> dict[str, torch.nn.Module]:
    return {"dense": dense(), "pruned": keep_blocks(dense(), [0, 2]), "routed": routed(),
            "dydit": DynamicModel(dense()).eval()}


LABELS = torch.tensor([0, 3, 5, 9])


def sample(model, **options):
    return generate(model, LABELS, sampler="ddim", steps=6, cfg_scale=1.5, seed=2, progress=False, **options)


@pytest.mark.parametrize("name", ["dense", "pruned", "routed", "dydit"])
def test_interval_one_is_the_model_itself_exactly(name):
    model = models()[name]
    plain = sample(model)
    cached = StepCache(copy.deepcopy(model), CacheSettings(interval=1, warmup=0))
    assert torch.equal(sample(cached), plain)


@pytest.mark.parametrize("name", ["dense", "pruned", "routed", "dydit"])
def test_cached_calls_run_no_block_and_reuse_the_stored_updates(name, monkeypatch):
    model = models()[name]
    cached = StepCache(copy.deepcopy(model), CacheSettings(interval=3, warmup=1))
    runs = []
    block_class = type(block_list(cached.inner)[0])  # a block's call still happens; its own forward only in full calls
    original = block_class.forward

    def counted(self, *args, **kwargs):
        runs.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(block_class, "forward", counted)
    images = sample(cached)
    monkeypatch.undo()
    # 6 DDIM calls per chunk: full at calls 0 (warm-up), 1 and 4; the others reuse.
    assert cached.full_calls == 3 and len(runs) == 3 * len(block_list(cached.inner))
    assert images.shape == sample(model).shape and torch.isfinite(images).all()
    assert not torch.equal(images, sample(model))  # the reuse is an approximation (its quality: the benchmark)


def test_a_cached_call_adds_each_blocks_stored_update_to_its_new_input():
    model = dense(2)
    cached = StepCache(copy.deepcopy(model), CacheSettings(interval=2, warmup=0))
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([900, 500, 100]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        cached(x, t, y)  # full: stores block(h) - h per block
        stored = [u[0].clone() for u in cached._updates]
        x2 = x + 0.1 * torch.randn_like(x)
        out = cached(x2, t - 10, y)  # cached
        tokens, c, t_emb = model.embed(x2, t - 10, y)
        for update in stored:
            tokens = tokens + update
        expected = model.unpatchify(model.final_layer(tokens, c))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_each_trajectory_starts_in_full_and_a_new_batch_never_reuses():
    cached = StepCache(dense(2), CacheSettings(interval=4, warmup=0))
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 20]), torch.tensor([1, 2])
    with torch.no_grad():
        cached(x, t, y)
        cached.reset()
        assert cached.settings.is_full(cached._calls)
        cached(x, t, y)
        cached(torch.randn(5, 1, 8, 8), torch.full((5,), 10), torch.zeros(5, dtype=torch.long))  # other batch: recomputed
    assert cached.full_calls == 1  # counted since the reset; the odd batch ran blocks though not a scheduled full call
    assert [u[0].shape[0] for u in cached._updates] == [5, 5]


def test_bench_counts_what_a_cached_trajectory_ran():
    plain, cached = dense(), StepCache(dense(), CacheSettings(interval=2, warmup=0))
    rows = measure_speed([("plain", plain), ("cached", cached)], batch_size=2, cfg_scale=1.0, warmup=0, rounds=1,
                         trajectory_steps=8)
    assert rows[1].flops_per_step < 0.7 * rows[0].flops_per_step  # half the calls run no block


def test_settings_and_misuse_are_refused(tmp_path, capsys):
    from leandit.cli import main

    with pytest.raises(ValueError, match="at least 1"):
        CacheSettings(interval=0)
    torch.manual_seed(0)
    folder = tmp_path / "m"
    leandit.save_model(tiny_model(), folder)
    out = tmp_path / "s"
    base = ["sample", str(folder), "--out", str(out), "--device", "cpu", "--quiet", "--num-samples", "2", "--steps", "4"]
    assert main([*base, "--cache-interval", "2"]) == 0
    assert json.loads((out / "sampling.json").read_text())["cache"] == {"interval": 2, "warmup": 1}
    capsys.readouterr()
    assert main(base) == 2  # a folder made with caching is not continued without it
    assert "--cache was" in capsys.readouterr().err
    assert backbone(StepCache(tiny_model())).spec.depth == 2  # the backbone interface sees through it


def test_bench_puts_a_model_beside_its_cached_self(tmp_path, capsys):
    from leandit.cli import main

    torch.manual_seed(0)
    folder = tmp_path / "m"
    leandit.save_model(dense(), folder)
    out = tmp_path / "bench.json"
    assert main(["bench", str(folder), str(folder), "--trajectory", "6", "--cache-interval", "1,3", "--rounds", "1",
                 "--warmup", "0", "--no-memory", "--device", "cpu", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows[1]["name"].endswith("(cache every 3)") and rows[1]["flops_per_step"] < 0.6 * rows[0]["flops_per_step"]
    capsys.readouterr()
    assert main(["bench", str(folder), "--cache-interval", "2", "--device", "cpu"]) == 2
    assert "add --trajectory" in capsys.readouterr().err

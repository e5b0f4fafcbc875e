"""Export of a depth-pruned model: a normal folder that loads and runs without any wrapper."""

from __future__ import annotations

import copy
import json

import torch

import leandit
from leandit.compress.depth import LearnablePruningJob, LearnableSettings, explicit, export_pruned, plain_state_dict
from leandit.models.blocks import keep_blocks, running_blocks

from conftest import randomize_, tiny_model


def _inputs(n=4):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 1000, (n,), generator=gen), torch.randint(0, 10, (n,), generator=gen)


def test_exported_model_runs_exactly_the_kept_blocks(tmp_path):
    source = randomize_(tiny_model(depth=6), std=0.2)
    source.source = "teacher-folder"
    before = copy.deepcopy(source.state_dict())
    decision = explicit([0, 3, 5], 6)
    folder = export_pruned(source, decision, tmp_path / "pruned")
    assert all(torch.equal(v, before[k]) for k, v in source.state_dict().items()) and len(source.blocks) == 6

    loaded = leandit.load_model(folder)
    assert type(loaded) is leandit.DiT and loaded.config.depth == 3 and len(loaded.blocks) == 3
    calls = []
    for block in loaded.blocks:
        block.register_forward_hook(lambda m, a, o: calls.append(m))
    x, t, y = _inputs()
    with torch.no_grad():
        out = loaded(x, t, y)
        with running_blocks(source, [0, 3, 5]):
            expected = source(x, t, y)
    assert len(calls) == 3 and torch.equal(out, expected)
    assert torch.equal(loaded.blocks[1].attn.qkv.weight, source.blocks[3].attn.qkv.weight)

    record = json.loads((folder / "compression.json").read_text())[-1]
    assert record["method"] == "indices" and record["kept_indices"] == [0, 3, 5] and record["removed_indices"] == [1, 2, 4]
    assert record["source"] == "teacher-folder" and record["source_depth"] == 6 and record["weights"] == "original"
    assert loaded.compression[-1]["kept_indices"] == [0, 3, 5]


def test_pruning_a_pruned_model_keeps_the_whole_history(tmp_path):
    first = export_pruned(randomize_(tiny_model(depth=8)), explicit([0, 2, 4, 5, 7], 8), tmp_path / "d5")
    second = export_pruned(leandit.load_model(first), explicit([0, 2, 4], 5), tmp_path / "d3")
    history = leandit.load_model(second).compression
    assert [r["kept_indices"] for r in history] == [[0, 2, 4, 5, 7], [0, 2, 4]]
    assert history[1]["source"] == str(first)


def test_learned_lora_delta_is_discarded_by_default_and_merged_on_request(tmp_path):
    source = randomize_(tiny_model(depth=4), std=0.2)
    job = LearnablePruningJob(copy.deepcopy(source), LearnableSettings(scheme="1:2", lora_rank=2))
    with torch.no_grad():
        for name, p in job.module.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
        job.gates.logits.copy_(torch.tensor([0.0, 0.05, 0.05, 0.0]))  # keep blocks 1 and 2
    decision = job.decision(None, steps=3)
    assert decision.kept == [1, 2]
    plain = leandit.load_model(export_pruned(source, decision, tmp_path / "plain"))
    merged = leandit.load_model(export_pruned(source, decision, tmp_path / "merged",
                                              plain_state_dict(job.module.backbone, merge=True), "lora-merged"))
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.equal(plain(x, t, y), keep_blocks(source, [1, 2])(x, t, y))
        # The merged export computes what the gated LoRA model computes with the decision's mask.
        gated = job.module(x, t, y, gate_masks=torch.tensor([0.0, 1.0, 1.0, 0.0]))
        assert torch.allclose(merged(x, t, y), gated, atol=1e-4)
        assert not torch.allclose(plain(x, t, y), gated, atol=1e-3)
    assert json.loads((tmp_path / "merged" / "compression.json").read_text())[-1]["weights"] == "lora-merged"

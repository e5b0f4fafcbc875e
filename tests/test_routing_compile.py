"""A routed model with a frozen schedule is compile-friendly: once each block's plan is set (one
capacity k, a Python int, per block), the backbone's forward through the `RoutedBlock`s (router,
top-k, sort, gather, the block on k tokens, scatter, the block-list swap) traces as one graph with
no breaks, static shapes, and one graph per timestep region (the region's k are constants of it).

A whole `RoutedModel.forward` breaks only where the plan finds each image's region from the t
tensor on the host (`regions.cpu().tolist()` in `_plans`); with the region known
(`routed.at_region(g)`, a sampler that knows its t) the whole forward is one graph with no break.
The third test pins that every break of a plain forward is in `_plans`, none inside the blocks.
Dynamo only (a counting backend, no inductor): graph breaks are dynamo's.
"""

from __future__ import annotations

import pytest
import torch

from conftest import randomize_, tiny_model
from leandit.compress.routing import RoutedModel, RoutingSettings

dynamo = pytest.importorskip("torch._dynamo")


def routed_tiny() -> RoutedModel:
    """3 blocks, 16 tokens, 2 regions; every block routed at some region (k < 16), block 2 dense
    at region 1 (the k = T path)."""
    torch.manual_seed(0)
    routed = RoutedModel(randomize_(tiny_model(depth=3), std=0.1), RoutingSettings(regions=2))
    for i, block in enumerate(routed.routed_blocks):
        randomize_(block.router, std=0.3, seed=1 + i)
    routed.eval().requires_grad_(False)
    routed.set_schedule([[8, 12], [4, 6], [10, 16]])
    return routed


def inputs(t: int, n: int = 3):
    gen = torch.Generator().manual_seed(t)
    return torch.randn(n, 1, 8, 8, generator=gen), torch.full((n,), t), torch.randint(0, 10, (n,), generator=gen)


class CountingBackend:
    """A dynamo backend that runs the traced graphs as they are and counts them."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def test_a_steps_forward_at_a_known_region_is_one_graph_without_breaks():
    routed = routed_tiny()
    backend = CountingBackend()

    def step(x, t, y):
        with routed._running_routed_blocks():
            return routed.inner(x, t, y)

    dynamo.reset()
    compiled = torch.compile(step, backend=backend, fullgraph=True)  # fullgraph: any break raises
    try:
        with torch.inference_mode():
            for t, graphs in [(700, 1), (700, 1), (100, 2), (100, 2), (600, 2)]:
                x, tt, y = inputs(t)
                plans = routed._plans(tt)[0]  # eager: the host decides the region
                for block, plan in zip(routed.routed_blocks, plans):
                    block.plan = plan
                try:
                    out = compiled(x, tt, y)
                finally:
                    for block in routed.routed_blocks:
                        block.plan = None
                torch.testing.assert_close(out, routed(x, tt, y), rtol=0, atol=0)
                assert len(backend.graphs) == graphs, f"t={t}: one graph per region, none recompiled within one"
        # the routed path is what was traced: the top-k and the gather/scatter are in the graph
        targets = {str(n.target) for gm in backend.graphs for n in gm.graph.nodes if n.op in ("call_method", "call_function")}
        assert any("topk" in s for s in targets) and any("index_select" in s for s in targets), targets
        assert any("index_copy" in s for s in targets), targets
    finally:
        dynamo.reset()


def test_a_whole_forward_at_a_known_region_compiles_as_one_graph_per_region():
    routed = routed_tiny()
    backend = CountingBackend()
    dynamo.reset()
    compiled = torch.compile(routed, backend=backend, fullgraph=True)  # fullgraph: any break raises
    try:
        with torch.inference_mode():
            for t, region, graphs in [(700, 1, 1), (900, 1, 1), (100, 0, 2), (300, 0, 2)]:
                x, tt, y = inputs(t)
                with routed.at_region(region):
                    out = compiled(x, tt, y)
                torch.testing.assert_close(out, routed(x, tt, y), rtol=0, atol=0)  # the eager forward finds the region itself
                assert len(backend.graphs) == graphs, f"t={t}: one graph per region, none recompiled within one"
                assert routed.last_macs.shape == (3,)
    finally:
        dynamo.reset()
    with pytest.raises(ValueError, match="outside 0..1"):
        with routed.at_region(2):
            pass


def test_a_whole_forwards_graph_breaks_are_all_in_the_plan_not_in_the_blocks():
    routed = routed_tiny()
    x, t, y = inputs(700)
    dynamo.reset()
    try:
        with torch.inference_mode():
            explanation = dynamo.explain(routed)(x, t, y)
    finally:
        dynamo.reset()
    # The backbone with its routed blocks is one graph, whatever happens in the plan before it.
    biggest = max(len(gm.graph.nodes) for gm in explanation.graphs)
    with torch.inference_mode():
        single = dynamo.explain(lambda a, b, c: routed.inner(a, b, c))(x, t, y)  # the dense backbone: one graph
    dynamo.reset()
    assert single.graph_break_count == 0
    assert biggest > len(single.graphs[0].graph.nodes), "the routed backbone traced as one graph"
    for reason in explanation.break_reasons:
        frames = [(f.filename, f.name) for f in reason.user_stack]
        assert any(path.endswith("routing/model.py") and "_plans" in name for path, name in frames), (
            f"a graph break outside RoutedModel._plans: {reason.reason.splitlines()[0]} at {frames[-3:]}")

"""Every benchmark script still imports against the current code: a name it imports from
leandit that was renamed or removed fails here, not months later when someone reruns it.
Imported as modules, so their `main()` does not run (names read inside main are not checked)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py")))
def test_the_benchmark_script_imports(script, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"benchmark_{script[:-3]}", BENCHMARKS / script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    assert callable(getattr(module, "main", None)), f"{script} has no main()"


def test_mar_speed_runs_at_a_tiny_size(monkeypatch, capsys, tmp_path):
    """benchmarks/mar_speed.py end to end on a tiny MAR (2 + 2 blocks, 16 tokens): the full
    model, two pruned splits, a guided row, strided iterations; the table is written."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("benchmark_mar_speed", BENCHMARKS / "mar_speed.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    tiny = ("MAR-B:input_size=8,patch_size=2,in_channels=1,hidden_size=32,encoder_depth=2,encoder_heads=2,"
            'decoder_hidden_size=32,decoder_depth=2,decoder_heads=2,buffer_size=4,num_classes=10,head_depth=2,head_width=32,space="pixel"')
    out = tmp_path / "mar.md"
    module.main(["--model", tiny, "--splits", "1+1,2+0", "--iterations", "8", "--head-steps", "3", "--stride", "2",
                 "--cfg-stride", "4", "--out", str(out)])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and ("(full)" in line or "(pruned)" in line)]
    assert len(rows) == 5  # 3 unguided rows, 2 guided
    assert "| 1 + 1 | 1 |" in out.read_text() and "| 2 + 0 | 1 |" in out.read_text() and "| 1 + 1 | 3 |" in out.read_text()
    assert "4 of 8 (2)" in out.read_text() and "2 of 8 (4)" in out.read_text() and "Machine: " in out.read_text()

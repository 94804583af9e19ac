"""Issue 21: with default flags (export --num-classes only, adapt with no --lr/--steps) TaskEdge beats the
linear probe. One seed of the digits MLP through tools/defaults_bench.py (README "Default flags": 5 of 5
seeds, by 4 to 15 points): 0.1 % of its 20,608 weights (20 entries) is raised to one input per neuron, the new head
starts at zero, the trials pick the rate; the probe is the same export with --head-only."""
from __future__ import annotations

import json

import pytest


def test_default_flags_beat_the_linear_probe_on_the_digits_mlp(tmp_path, capsys):
    pytest.importorskip("torch", reason="host-only: the bench exports the model")
    from taskedge.tools import defaults_bench
    assert defaults_bench.main(["--out", str(tmp_path), "--models", "mlp", "--budgets", "0.001", "--seeds", "0",
                                "--threads", "1"]) == 0
    runs = {r["budget"]: r for r in map(json.loads, (tmp_path / "defaults.jsonl").read_text().splitlines())}
    te, probe = runs["0.001"], runs[defaults_bench.PROBE]
    assert te["entries"] == 128 and probe["entries"] == 0                # one input in each of the 128 neurons
    assert te["head_start"] == probe["head_start"] == "zero" and te["steps"] == probe["steps"] == 100
    assert te["accuracy"] > probe["accuracy"] + 0.02, (te, probe)
    assert "| mlp | 0.001: 128 |" in (tmp_path / "defaults.md").read_text()
    assert defaults_bench.main(["--out", str(tmp_path), "--models", "mlp,nope"]) == 2
    assert "bad --models 'mlp,nope'" in capsys.readouterr().err

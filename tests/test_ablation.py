"""`taskedge bench --selection-ablation` (tools/bench/ablation.py): the quick form end to end on the
small digits transformer (5 rules x 2 seeds: export + adapt each), and its statistics on known inputs."""
import json

import numpy as np
import pytest

pytest.importorskip("torch")


@pytest.mark.slow      # 1-2 min: .ci/run runs it after make test (make test-benches)
def test_quick_ablation_runs_every_rule_at_the_same_budget(tmp_path, capsys):
    from taskedge.tools.bench.cli import main
    out, work = tmp_path / "abl", tmp_path / "work"
    argv = ["--selection-ablation", "--quick", "--tasks", "digits-new", "--seeds", "2", "--steps", "10",
            "--workdir", str(work), "--out", str(out), "--json", "--quiet"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert {p.name for p in out.iterdir()} >= {"ablation.md", "ablation.json"}
    t = r["tasks"]["digits-new"]
    assert r["selections"] == ["taskedge", "magnitude", "activation", "gradient", "random", "head-only"]
    rules = r["selections"][:-1]
    runs = [x for sel in rules for x in t["runs"][sel]]
    assert len(runs) == 5 * 2 and {x["seed"] for x in runs} == {0, 1}
    assert len({(x["k"], x["update_params"]) for x in runs}) == 1          # the same budget for every rule
    assert all(0.0 <= x["accuracy"] <= 1.0 and x["lr"] > 0 for x in runs)
    probe = t["runs"]["head-only"]          # the reference: the same new head, alone
    assert len(probe) == 2 and {(x["k"], x["update_params"]) for x in probe} == {(0, 0)}
    assert {x["head_params"] for x in runs + probe} == {5 * 33}
    assert "head-only" not in t["jaccard"]
    for sel in rules:                       # one lr per rule, from the runtime's trials at seed 0
        trials = [row["lr"] for row in t["lr"][sel]["trials"]]      # the start, then the walk from 1e-2, 3e-2
        assert t["lr"][sel]["picked_at_seed"] == 0 and trials[:3] == [None, 1e-2, 3e-2] and len(trials) <= 5
        assert {x["lr"] for x in t["runs"][sel]} == {t["lr"][sel]["lr"]}
        assert t["jaccard"][sel][sel] == 1.0
        assert t["summary"][sel]["seeds"] == 2
    j = t["jaccard"]
    # magnitude is half of taskedge's score: their picks overlap far more than taskedge and random do
    assert j["taskedge"]["magnitude"] > 2 * j["taskedge"]["random"]
    assert j["taskedge"]["random"] < 0.2 and j["taskedge"]["gradient"] < 1.0
    md = (out / "ablation.md").read_text()
    assert "| digits-new |" in md and "Jaccard" in md
    # the work folder records every run: asked again (here for two rules), nothing is re-run
    records = sorted((work / "digits-new" / "runs").glob("*.json"))
    assert len(records) == 12
    stamps = [p.stat().st_mtime_ns for p in records]
    assert main(argv + ["--selections", "random,taskedge"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["selections"] == ["taskedge", "random"]
    assert again["tasks"]["digits-new"]["runs"]["random"] == t["runs"]["random"]
    assert [p.stat().st_mtime_ns for p in records] == stamps
    # --lr: every run at that rate, no trials, recorded apart from the trial-picked runs
    assert main(argv + ["--selections", "random", "--lr", "0.02"]) == 0
    fixed = json.loads(capsys.readouterr().out)["tasks"]["digits-new"]["runs"]["random"]
    assert [(x["lr"], x["lr_trials"]) for x in fixed] == [(0.02, None)] * 2
    assert len(list((work / "digits-new" / "runs-lr0.02").glob("*.json"))) == 2


def test_jaccard_and_paired_summary():
    from taskedge.tools.bench.ablation import jaccard, summarize
    a = {"w1": np.array([1, 2, 3]), "w2": np.array([5])}
    b = {"w1": np.array([2, 3, 4]), "w2": np.array([6])}
    assert jaccard(a, a) == 1.0
    assert jaccard(a, b) == pytest.approx(2 / 6)              # {2, 3} of {1, 2, 3, 4} and {5, 6}
    runs = {"taskedge": [{"seed": 0, "accuracy": 0.8}, {"seed": 1, "accuracy": 0.7}],
            "random": [{"seed": 1, "accuracy": 0.6}, {"seed": 0, "accuracy": 0.75}]}
    s = summarize(runs)
    assert s["random"]["mean"] == pytest.approx(0.675) and s["random"]["min"] == 0.6
    assert s["random"]["vs_taskedge_mean"] == pytest.approx(-0.075)   # paired by seed: -0.05 and -0.10
    assert s["random"]["vs_taskedge_std"] == pytest.approx(np.std([-0.05, -0.1], ddof=1))


@pytest.mark.parametrize("argv, says", [
    (["--seeds", "1"], "--seeds: '1' must be >= 2"),
    (["--quick", "--tasks", "text"], "--tasks text: not a --quick task"),
    (["--tasks", "nope"], "task ['nope'] unknown"),
    (["--lr", "0"], "--lr: '0' must be a finite number > 0"),
])
def test_bad_flags_are_one_line_exit_2(argv, says, capsys):
    from taskedge.runtime.cli import main
    try:
        code = main(["bench", "--selection-ablation", *argv])       # refused after parsing: returns 2
    except SystemExit as e:                                          # refused by the parser: exits 2
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err

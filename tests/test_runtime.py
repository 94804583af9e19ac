"""Device runtime: no torch, budgets, checkpoints/resume, merge."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from taskedge.runtime import bundle as B

from conftest import run_cli


def test_runtime_never_imports_torch():
    code = ("import sys, pkgutil, importlib, taskedge.runtime as r\n"
            "names = [m.name for m in pkgutil.walk_packages(r.__path__, 'taskedge.runtime.')]\n"
            "assert 'taskedge.runtime.train.session' in names, names\n"
            "for name in names: importlib.import_module(name)\n"
            "from taskedge.runtime.cli import build_parser; build_parser()\n"
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'onnxruntime.training')))\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _adapt(bundle, data, run_dir, *extra):
    r = run_cli("adapt", bundle, "--data", data, "--run-dir", run_dir, "--quiet", "--json", "--lr", "0.01", *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_adapt_trains_and_reports(tmp_path, mlp_bundle, mlp_data):
    rep = _adapt(mlp_bundle, mlp_data / "train.npz", tmp_path / "run", "--steps", "60",
                 "--eval-data", mlp_data / "test.npz", "--profile", "jetson-orin-nano-8gb")
    assert rep["stop_reason"] == "steps" and rep["steps"] == 60
    assert rep["loss"]["last10_mean"] < rep["loss"]["first10_mean"]
    assert rep["accuracy"]["after"] > rep["accuracy"]["before"]
    assert rep["energy"]["measured"] is False and "estimate" in rep["energy"]["source"]
    assert rep["memory"]["measured"] is True and rep["memory"]["peak_rss_mb"] > 0
    assert (tmp_path / "run" / "update.npz").is_file()


def test_resume_after_energy_stop_gives_the_same_update(tmp_path, mlp_bundle, mlp_data):
    data = mlp_data / "train.npz"
    full = _adapt(mlp_bundle, data, tmp_path / "a", "--steps", "40")
    part = _adapt(mlp_bundle, data, tmp_path / "b", "--steps", "40", "--energy-budget-j", "0.03")
    assert part["stop_reason"] == "energy_budget" and 0 < part["steps"] < 40
    # stopped within one step's energy of the budget, and left a checkpoint
    per_step = part["energy"]["joules"] / part["steps"]
    assert part["energy"]["joules"] <= 0.03 + 2 * per_step
    assert (tmp_path / "b" / f"ckpt-{part['steps']:08d}").is_file()
    rest = _adapt(mlp_bundle, data, tmp_path / "b", "--steps", "40", "--resume", "--energy-budget-j", "1000")
    assert rest["steps"] == 40 and rest["steps_this_run"] == 40 - part["steps"]
    a, b = np.load(tmp_path / "a" / "update.npz"), np.load(tmp_path / "b" / "update.npz")
    for k in a.files:
        assert np.array_equal(a[k], b[k]), k          # bit-identical


def test_resume_with_only_the_bundle_continues_the_run_with_its_settings(tmp_path, mlp_bundle, mlp_data):
    """`adapt BUNDLE --run-dir R --resume` takes the run's data, eval data, batch size, seed, profile and schedule:
    the update is bit-identical to an uninterrupted run's. A flag that contradicts the run is refused."""
    profile = tmp_path / "board.toml"          # by path, under a name of its own: the report shows it was used
    host = Path(__file__).resolve().parents[1] / "device_profiles" / "host-cpu.toml"
    profile.write_text(host.read_text().replace('name = "host-cpu"', 'name = "my-board"'))
    data, test = mlp_data / "train.npz", mlp_data / "test.npz"
    flags = ("--eval-data", test, "--batch-size", "16", "--seed", "3", "--profile", profile, "--steps", "40",
             "--schedule", "linear", "--warmup", "3")
    _adapt(mlp_bundle, data, tmp_path / "a", *flags)
    part = _adapt(mlp_bundle, data, tmp_path / "b", *flags, "--energy-budget-j", "0.03")
    assert part["stop_reason"] == "energy_budget" and 0 < part["steps"] < 40
    r = run_cli("adapt", mlp_bundle, "--run-dir", tmp_path / "b", "--resume", "--batch-size", "32")
    err = r.stderr.strip().splitlines()[-1]             # one line: the flag, both values, the fix
    assert r.returncode == 2 and err.startswith("taskedge adapt: error:"), r.stderr
    assert "--batch-size: 16 then, 32 now" in err and "leave" in err and "--fresh" in err, err
    r = run_cli("adapt", mlp_bundle, "--run-dir", tmp_path / "b", "--resume", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rest = json.loads(r.stdout)
    assert "resuming with the run's settings: --data " in r.stderr
    assert rest["steps"] == 40 and rest["steps_this_run"] == 40 - part["steps"] and rest["stop_reason"] == "steps"
    assert rest["profile"] == "my-board" and rest["effective_batch"] == 16
    assert rest["accuracy"]["eval_source"] == str(test.resolve())
    assert set(rest["resume"]["taken_from_run"]) == {"data", "eval_data", "batch_size", "seed", "profile", "steps",
                                                     "lr", "schedule", "warmup"} and not rest["resume"]["changed"]
    a, b = np.load(tmp_path / "a" / "update.npz"), np.load(tmp_path / "b" / "update.npz")
    for k in a.files:
        assert np.array_equal(a[k], b[k]), k          # bit-identical


def test_adapt_without_data_says_how_to_give_it(tmp_path, mlp_bundle):
    r = run_cli("adapt", mlp_bundle, "--run-dir", tmp_path / "none")
    assert r.returncode == 2 and "--data is required" in r.stderr, r.stderr
    r = run_cli("adapt", mlp_bundle, "--run-dir", tmp_path / "none", "--resume")
    assert r.returncode == 2 and "no checkpoint recording --data" in r.stderr and "give --data" in r.stderr


def test_existing_run_needs_resume_or_fresh(tmp_path, mlp_bundle, mlp_data):
    _adapt(mlp_bundle, mlp_data / "train.npz", tmp_path / "r", "--steps", "3")
    r = run_cli("adapt", mlp_bundle, "--data", mlp_data / "train.npz", "--run-dir", tmp_path / "r", "--steps", "3")
    assert r.returncode == 2 and "--resume" in r.stderr


def test_merge_matches_eval_outputs_and_runs_in_plain_onnxruntime(tmp_path, mlp_bundle, mlp_data):
    from taskedge.runtime.trainer import Trainer, TrainState
    _adapt(mlp_bundle, mlp_data / "train.npz", tmp_path / "run", "--steps", "30")
    merged = tmp_path / "merged.onnx"
    r = run_cli("merge", mlp_bundle, "--out", merged, "--run-dir", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    z = np.load(mlp_data / "test.npz")
    man = B.load_bundle(mlp_bundle)
    tr = Trainer(mlp_bundle, man, TrainState.from_file(tmp_path / "run" / "ckpt-00000030", man.trainable_names))
    want = tr.eval_step([z["x"], z["labels"]])[1]
    sess = ort.InferenceSession(str(merged), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": z["x"]})[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    base = ort.InferenceSession(str(mlp_bundle / B.BASE_MODEL), providers=["CPUExecutionProvider"])
    assert np.abs(base.run(None, {"x": z["x"]})[0] - got).max() > 1e-3     # the update did change the model
    r = run_cli("eval", mlp_bundle, "--data", mlp_data / "test.npz", "--model", merged, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["accuracy"] == pytest.approx(
        float((got.argmax(1) == z["labels"]).mean()))


@pytest.fixture(scope="module")
def conv_bundle(tmp_path_factory):
    """A conv net on 48x48 images: activations grow with the batch, so the plan matters."""
    import torch
    from taskedge.export.config import ExportConfig
    from taskedge.export.exporter import export_bundle

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(32, 32, 3, padding=1, groups=32), torch.nn.ReLU(),
                              torch.nn.Conv2d(32, 32, 1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 4))
    d = tmp_path_factory.mktemp("conv")
    torch.onnx.export(net, (torch.randn(2, 3, 48, 48),), str(d / "c.onnx"), dynamo=False, input_names=["pixels"],
                      output_names=["y"], dynamic_axes={"pixels": {0: "b"}, "y": {0: "b"}}, opset_version=17)
    rng = np.random.default_rng(0)
    px = rng.standard_normal((256, 3, 48, 48)).astype(np.float32)
    np.savez(d / "data.npz", pixels=px, labels=rng.integers(0, 4, 256))
    export_bundle(ExportConfig(model=str(d / "c.onnx"), out=str(d / "bundle"), calib=str(d / "data.npz"),
                               budget=0.05, num_classes=4), log=lambda m: None)
    return d


def test_memory_budget_plans_micro_batch_and_peak_stays_under(tmp_path, conv_bundle):
    data = conv_bundle / "data.npz"
    free = _adapt(conv_bundle / "bundle", data, tmp_path / "a", "--steps", "3", "--batch-size", "64",
                  "--memory-budget-mb", "20000")
    plan = free["memory"]["plan"]
    assert plan["micro_batch"] == 64 and plan["mb_per_sample"] > 0.5
    # a budget between batch-1's need and the full batch's: the plan must shrink the micro-batch
    budget = plan["peak_mb_at_1"] + 0.4 * (free["memory"]["peak_rss_mb"] - plan["peak_mb_at_1"])
    tight = _adapt(conv_bundle / "bundle", data, tmp_path / "b", "--steps", "3", "--batch-size", "64",
                   "--memory-budget-mb", f"{budget:.0f}")
    print(f"budget {budget:.0f} MB: plan {tight['memory']['plan']}, peak {tight['memory']['peak_rss_mb']} MB "
          f"(unconstrained peak {free['memory']['peak_rss_mb']} MB)")
    assert tight["memory"]["plan"]["micro_batch"] < 64
    assert tight["memory"]["peak_rss_mb"] <= budget


def test_memory_budget_below_batch_one_refuses_before_training(tmp_path, conv_bundle):
    r = run_cli("adapt", conv_bundle / "bundle", "--data", conv_bundle / "data.npz", "--run-dir", tmp_path / "r",
                "--memory-budget-mb", "50", "--steps", "3")
    assert r.returncode == 2 and "even micro-batch 1" in r.stderr
    assert not list((tmp_path / "r").glob("ckpt-*")) and not (tmp_path / "r" / "update.npz").exists()   # nothing written


def test_bad_data_is_named(tmp_path, mlp_bundle):
    np.savez(tmp_path / "bad.npz", x=np.zeros((8, 16), np.float32), labels=np.full(8, 7))
    r = run_cli("adapt", mlp_bundle, "--data", tmp_path / "bad.npz", "--run-dir", tmp_path / "r")
    assert r.returncode == 2 and "bad.npz" in r.stderr and "label 7" in r.stderr


def test_checkpoint_holds_only_the_trainable_state(tmp_path, mlp_bundle, mlp_data):
    rep = _adapt(mlp_bundle, mlp_data / "train.npz", tmp_path / "run", "--steps", "5")
    man = B.load_bundle(mlp_bundle)
    with np.load(rep["checkpoint"]) as z:             # packed: three flat arrays, the layout, the update count
        assert sorted(z.files) == ["layout", "m", "param", "updates", "v"]
        assert [n for n, _ in json.loads(str(z["layout"][()]))] == list(man.trainable_names)
        assert len(z["param"]) == len(z["m"]) == len(z["v"]) == man.trainable_params
        assert int(z["updates"]) == 5
    from taskedge.runtime.trainer import TrainState
    state = TrainState.from_file(rep["checkpoint"], man.trainable_names)
    assert sum(a.size for a in state.params.values()) == man.trainable_params
    old = tmp_path / "old.npz"                       # a member per tensor (checkpoints before the packed layout)
    np.savez(old, updates=np.array(5), **{f"{k}/{n}": getattr(state, a)[n] for k, a in
                                          (("param", "params"), ("m", "m"), ("v", "v")) for n in man.trainable_names})
    again = TrainState.from_file(old, man.trainable_names)
    assert again.updates == 5 and all(np.array_equal(again.v[n], state.v[n]) for n in man.trainable_names)
    assert rep["checkpoint_bytes"] == (tmp_path / "run" / "ckpt-00000005").stat().st_size
    assert rep["checkpoint_write_seconds"] is not None


def test_resume_refuses_other_data_and_notes_a_longer_schedule(tmp_path, mlp_bundle, mlp_data):
    data = mlp_data / "train.npz"
    part = _adapt(mlp_bundle, data, tmp_path / "r", "--steps", "40", "--energy-budget-j", "0.03")
    assert part["stop_reason"] == "energy_budget"
    r = run_cli("adapt", mlp_bundle, "--data", mlp_data / "test.npz", "--run-dir", tmp_path / "r", "--quiet",
                "--lr", "0.01", "--steps", "40", "--resume")
    assert r.returncode == 2 and "--data:" in r.stderr and "--fresh" in r.stderr, r.stderr
    r = run_cli("adapt", mlp_bundle, "--data", data, "--run-dir", tmp_path / "r", "--quiet", "--lr", "0.01",
                "--steps", "40", "--seed", "1", "--resume")
    assert r.returncode == 2 and "--seed: 0 then, 1 now" in r.stderr, r.stderr
    r = run_cli("adapt", mlp_bundle, "--data", data, "--run-dir", tmp_path / "r", "--lr", "0.01",
                "--steps", "50", "--resume", "--json")          # extending the run is allowed, and said
    assert r.returncode == 0, r.stderr
    assert "--steps: 40 then, 50 now" in r.stderr and json.loads(r.stdout)["steps"] == 50


def test_shape_aware_run_shrinks_only_when_shapes_change_and_keeps_outputs(tmp_path):
    """Variable-length batches return the arena's chunks after the run (runtime/trainer.py
    ShapeAwareRun); the outputs stay those of a plain run, at every shape."""
    from onnx import TensorProto, helper
    from taskedge.runtime.trainer import ShapeAwareRun, open_session
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t"])
    g = helper.make_graph([helper.make_node("Mul", ["x", "x"], ["y"])], "sq", [x], [y])
    path = tmp_path / "sq.onnx"
    path.write_bytes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8).SerializeToString())
    run = ShapeAwareRun(open_session(path, threads=1))
    seen = []
    real = run.session.run
    run.session = type("S", (), {"run": lambda self, o, f, opts=None: seen.append(opts is not None) or real(o, f, opts)})()
    for b, t in ((2, 5), (2, 5), (2, 7), (2, 3), (2, 3), (1, 3)):
        a = np.random.default_rng(t).standard_normal((b, t)).astype(np.float32)
        np.testing.assert_array_equal(run({"x": a})[0], a * a)
    assert seen == [False, False, True, True, False, False]      # a smaller last batch does not shrink

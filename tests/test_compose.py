"""A new task started from stored tasks (issue 12, step 6): `adapt --task NEW --init NAME|nearest`,
and a finished run pruned to its task state (the disk target of ten tasks on one base)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from taskedge.runtime import bundle as B
from taskedge.runtime.compose import carried_state, load_allocation
from taskedge.runtime.merge import dense_delta
from taskedge.runtime.store import TaskStore
from tests.test_tasks import _trained, run_cli, second_bundle  # noqa: F401  (the 4-class MLP task fixture)


@pytest.fixture()
def store(tmp_path, mlp_bundle, second_bundle):   # noqa: F811
    """new (untrained), twin (trained, new's allocation), four (trained, another allocation)."""
    root = tmp_path / "store"
    for src, name in ((mlp_bundle, "new"), (mlp_bundle, "twin"), (second_bundle, "four")):
        assert run_cli("task", "add", src, "--name", name, "--store", root).returncode == 0
    st = TaskStore(root)
    _trained(st, "twin", seed=1)
    _trained(st, "four", seed=2)
    return st


def _dense(folder):
    """{weight: {(row, col): value}} of a task's trained delta."""
    m = B.read_manifest(folder)
    params = B.read_task_state(folder / B.TASK_STATE, m, B.allocation_digest(folder, m))
    alloc = load_allocation(folder)
    out = {}
    for la in m.layers:
        idx, vals = alloc[la.weight], dense_delta(la, params, alloc[la.weight])
        out[la.weight] = {(r, int(c)): float(v) for r in range(la.rows) for c, v in zip(idx[r], vals[r])}
    return out


def test_carried_delta_is_the_donors_at_shared_entries(store):
    new, four = store.task_dir("new"), store.task_dir("four")
    m, d = B.read_manifest(new), B.read_manifest(four)
    donor = B.read_task_state(four / B.TASK_STATE, d, B.allocation_digest(four, d))
    params, kept = carried_state(new, m, four, d, donor)
    alloc, theirs = load_allocation(new), _dense(four)
    shared = total = 0.0
    for la in m.layers:
        got = dense_delta(la, params, alloc[la.weight])
        for r in range(la.rows):
            for c, v in zip(alloc[la.weight][r], got[r]):
                want = theirs[la.weight].get((r, int(c)), 0.0)
                assert v == np.float32(want)                       # the donor's value, or 0 where it has none
                shared += want * want
        total += sum(v * v for v in theirs[la.weight].values())
    assert 0 < kept < 1 and kept == pytest.approx(shared / total, rel=1e-5)   # other allocations overlap in part
    with np.load(new / B.INITIAL_STATE) as z:                                 # the head starts fresh
        assert all(np.array_equal(params[n], z[n]) for n in m.head["params"])


def test_init_nearest_picks_the_task_that_keeps_most_and_trains(store, mlp_data):
    train = mlp_data / "train.npz"
    r = run_cli("adapt", "--task", "new", "--store", store.root, "--init", "nearest", "--data", train, "--steps", 3,
                "--quiet", "--json")
    assert r.returncode == 0, r.stderr
    init = json.loads(r.stdout)["init"]
    assert init["from"] == "twin" and init["kept_share"] == 1.0 and 0 < init["candidates"]["four"] < 1
    assert store.record("new")["trained"]["init"] == "twin"
    r = run_cli("adapt", "--task", "new", "--store", store.root, "--init", "nearest:four", "--data", train,
                "--steps", 3, "--quiet", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["init"]["from"] == "four"


def test_init_from_itself_continues_a_pruned_run(store, mlp_data):
    train = mlp_data / "train.npz"
    args = ("adapt", "--task", "new", "--store", store.root, "--data", train, "--steps", 5, "--lr", "0.01", "--json")
    first = json.loads(run_cli(*args).stdout)
    r = run_cli("adapt", "--task", "new", "--store", store.root, "--resume")
    assert r.returncode == 2 and "--init new" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli(*args)                                              # a trained task is not restarted silently
    assert r.returncode == 2 and "--fresh" in r.stderr and "--init new" in r.stderr
    r = run_cli(*args, "--init", "new", "--keep-run")
    assert r.returncode == 0, r.stderr
    again = json.loads(r.stdout)
    assert again["accuracy"]["before"] == first["accuracy"]["after"]   # it starts where the task state is
    assert [p.name for p in (store.task_dir("new") / "run").glob("ckpt-*")] and store.record("new")["trained"][
        "checkpoints"] == "kept"


@pytest.mark.parametrize("args, words", [
    (("--init", "nearest"), "no other trained task"),
    (("--init", "ghost"), "no task 'ghost'"),
    (("--init", "nearest:"), "give the tasks after the colon"),
    (("--init", "twin", "--resume"), "give one of them"),
])
def test_init_refusals_are_one_line(tmp_path, mlp_bundle, mlp_data, args, words):
    root = tmp_path / "store"
    for name in ("new", "twin"):
        assert run_cli("task", "add", mlp_bundle, "--name", name, "--store", root).returncode == 0
    r = run_cli("adapt", "--task", "new", "--store", root, "--data", mlp_data / "train.npz", "--steps", 1, *args)
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (TaskStore(root).task_dir("new") / B.TASK_STATE).exists()


def test_init_needs_a_task(mlp_bundle, mlp_data):
    r = run_cli("adapt", mlp_bundle, "--init", "nearest", "--data", mlp_data / "train.npz", "--steps", 1)
    assert r.returncode == 2 and "--task" in r.stderr


# --------------------------------------------------------------------------------------------- gates
@pytest.fixture(scope="module")
def union_bundle(tmp_path_factory, mlp_onnx, mlp_data, mlp_bundle, second_bundle):   # noqa: F811
    from taskedge.export.config import ExportConfig
    from taskedge.export.exporter import export_bundle
    out = tmp_path_factory.mktemp("bundles") / "mix"
    export_bundle(ExportConfig(model=str(mlp_onnx), out=str(out), calib=str(mlp_data / "test.npz"), budget=0.05,
                               num_classes=3, seed=5, union_of=[str(mlp_bundle), str(second_bundle)]), log=lambda m: None)
    return out


@pytest.fixture()
def gate_store(store, union_bundle):
    assert run_cli("task", "add", union_bundle, "--name", "mix", "--store", store.root).returncode == 0
    return store


def test_union_allocation_holds_every_entry_of_the_given_tasks(union_bundle, mlp_bundle, second_bundle):  # noqa: F811
    mine = load_allocation(union_bundle)
    assert B.read_manifest(union_bundle).method["union_of"][0]["task"] == str(mlp_bundle)
    for other in (mlp_bundle, second_bundle):
        for w, idx in load_allocation(other).items():
            for r in range(len(idx)):
                assert set(idx[r]) <= set(mine[w][r])
    a, b = load_allocation(mlp_bundle), load_allocation(second_bundle)
    for w, idx in mine.items():        # as wide as the widest union; the rest this task's own best (no repeats)
        assert idx.shape[1] == max(len(set(x) | set(y)) for x, y in zip(a[w], b[w]))
        assert all(len(set(row)) == len(row) for row in idx)


def test_gate_gradient_matches_finite_differences(gate_store, mlp_data):
    from taskedge.runtime.compose import initial
    from taskedge.runtime.gates import GATES, GatedTrainer
    from taskedge.runtime.trainer import TrainState
    init, info, mix = initial(gate_store, "mix", "gates")
    assert info["tasks"] == ["four", "twin"] and init[GATES].shape == (2, len(mix.deltas))
    folder = gate_store.task_dir("mix")
    rng = np.random.default_rng(0)
    init[GATES] = rng.uniform(-1, 1, init[GATES].shape).astype(np.float32)
    tr = GatedTrainer(folder, B.read_manifest(folder), TrainState(init), threads=1, mix=mix)
    with np.load(mlp_data / "test.npz") as z:
        batch = [z["x"][:64], z["labels"][:64]]
    tr.train_step(batch)
    grad = tr._grad_sum[GATES] / tr._grad_count
    eps = 1e-3                          # central differences of the float32 loss (measured: within 1 % here)
    for t, j in [(0, 0), (1, len(mix.deltas) - 1), (0, 1), (1, 0)]:
        loss = []
        for s in (eps, -eps):
            tr.state.params[GATES][t, j] += s
            loss.append(tr.eval_step(batch)[0])
            tr.state.params[GATES][t, j] -= s
        fd = (loss[0] - loss[1]) / (2 * eps)
        assert grad[t, j] == pytest.approx(fd, rel=3e-2, abs=3e-4), (t, j)
    assert np.abs(grad).max() > 1e-3                                # the check is not of zeros


def test_adapt_init_gates_trains_gates_and_writes_the_mixed_delta(gate_store, mlp_data):
    from taskedge.runtime.compose import initial
    from taskedge.runtime.gates import GATES
    from taskedge.runtime.trainer import TrainState
    r = run_cli("adapt", "--task", "mix", "--store", gate_store.root, "--init", "gates", "--data",
                mlp_data / "train.npz", "--steps", 4, "--lr", "0.01", "--keep-run", "--quiet", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["init"]["from"] == "gates" and report["init"]["tasks"] == ["four", "twin"]
    folder = gate_store.task_dir("mix")
    ckpt = sorted((folder / "run").glob("ckpt-????????"))[-1]
    _, _, mix = initial(gate_store, "mix", "gates")
    state = TrainState.from_file(ckpt, mix.names)
    assert np.abs(state.params[GATES]).max() > 0                    # the gates moved
    m = B.read_manifest(folder)
    written = B.read_task_state(folder / B.TASK_STATE, m, B.allocation_digest(folder, m))
    for n, a in mix.inner(state.params).items():                    # the task state is the mix of those gates
        np.testing.assert_array_equal(written[n], a)
    r = run_cli("adapt", "--task", "mix", "--store", gate_store.root, "--resume", "--steps", 6, "--quiet", "--json")
    assert r.returncode == 0, r.stderr                              # a gates run resumes as a gates run
    assert json.loads(r.stdout)["steps"] == 6


def test_gates_refuse_a_task_the_allocation_does_not_hold(store, mlp_data, mlp_onnx):
    r = run_cli("adapt", "--task", "twin", "--store", store.root, "--init", "gates:four", "--fresh", "--data",
                mlp_data / "train.npz", "--steps", 1)
    assert r.returncode == 2 and "--union-of" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run_cli("export", mlp_onnx, "--calib", mlp_data / "test.npz", "--num-classes", 3, "--out",
                store.root / "never", "--union-of", store.root / "missing")
    assert r.returncode == 2 and "--union-of" in r.stderr and not (store.root / "never").exists(), r.stderr

"""The fleet's parts that need no federation (issue 13): aggregation, the exchange format's checks,
the bytes comparison, the Flower app that `taskedge fleet serve` writes, and the command's errors.
The federation itself runs in tests/faults/test_fleet.py."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from taskedge.runtime import bundle as B
from taskedge.runtime.fleet import aggregate as A, exchange as X
from taskedge.runtime.fleet.options import BoardConfig, FleetOptions
from taskedge.runtime.fsutil import UserError

from conftest import run_cli


def _states(values):
    return [{"w": np.full((2, 3), v, np.float32), "b": np.array([v], np.float32)} for v in values]


def test_fedavg_weights_by_examples():
    out = A.aggregate("fedavg", _states([1.0, 4.0]), [300, 100])
    assert np.allclose(out["w"], 1.75) and out["w"].dtype == np.float32


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_robust_rules_are_not_moved_by_one_bad_client(rule):
    good = A.aggregate(rule, _states([1.0, 1.1, 0.9, 1.05]), [1, 1, 1, 1])
    poisoned = A.aggregate(rule, _states([1.0, 1.1, 0.9, 1e6]), [1, 1, 1, 1])
    assert np.all(np.abs(poisoned["w"] - good["w"]) < 0.1), (good["w"], poisoned["w"])
    assert np.all(A.aggregate("fedavg", _states([1.0, 1.1, 0.9, 1e6]), [1, 1, 1, 1])["w"] > 1e5)


def test_unknown_rule_and_empty_round():
    with pytest.raises(ValueError, match="unknown aggregation"):
        A.aggregate("mean", _states([1.0]), [1])
    with pytest.raises(ValueError, match="no states"):
        A.aggregate("fedavg", [], [])


def test_exchange_refuses_what_does_not_fit(mlp_bundle):
    man = B.load_bundle(mlp_bundle)
    ours = X.allocation_hash(mlp_bundle, man)
    state = X.initial_state(mlp_bundle, man)
    spec = X.expected(state)
    assert set(state) == set(man.trainable_names) and X.check(state, spec, ours, ours) is None
    name = man.trainable_names[0]
    nan = {**state, name: state[name].copy()}
    nan[name].flat[0] = np.nan
    assert "NaN/Inf" in X.check(nan, spec, ours, ours)
    assert "expected float32" in X.check({**state, name: state[name][..., :-1]}, spec, ours, ours)
    assert "expected float32" in X.check({**state, name: state[name].astype(np.float64)}, spec, ours, ours)
    assert "missing" in X.check({k: v for k, v in state.items() if k != name}, spec, ours, ours)
    assert "allocation hash" in X.check(state, spec, "f" * 32, ours)
    # the same allocation over another base, or another allocation, names another fleet
    other_base = dataclasses.replace(man, files={**man.files, B.WEIGHTS: {"sha256": "0" * 64, "bytes": 1}})
    assert X.allocation_hash(mlp_bundle, other_base) != ours
    other_head = dataclasses.replace(man, layers=man.layers[:-1])
    assert X.allocation_hash(mlp_bundle, other_head) != ours


def test_state_travels_as_a_flower_record(mlp_bundle):
    pytest.importorskip("flwr")
    man = B.load_bundle(mlp_bundle)
    state = X.initial_state(mlp_bundle, man)
    record = X.to_record(state)
    back = X.from_record(record)
    assert all(np.array_equal(back[k], state[k]) for k in state)
    raw = sum(a.nbytes for a in state.values())
    assert raw <= X.record_bytes(record) < raw + 200 * len(state)      # the payload plus small headers


def test_bytes_compared_with_lora_and_full_fine_tuning(mlp_bundle):
    man = B.load_bundle(mlp_bundle)
    b = X.comparison_bytes(man)
    assert b["taskedge"] == 4 * man.trainable_params == sum(a.nbytes for a in X.initial_state(mlp_bundle, man).values())
    assert b["taskedge"] < b["lora_r8"] < b["full_ft"]


def test_the_flower_app_is_valid_and_its_config_is_fleet_options(tmp_path):
    pytest.importorskip("flwr")
    import tomli
    from flwr.common.config import validate_config

    from taskedge.runtime.fleet import launch
    cfg = tomli.loads((launch.write_app(tmp_path) / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(cfg, check_module=True, project_dir=tmp_path)
    assert ok, errors
    opts = FleetOptions(bundle="b", rounds=3, aggregate="median").resolved()
    assert set(cfg["tool"]["flwr"]["app"]["config"]) == set(opts.run_config())
    assert FleetOptions.from_run_config(opts.run_config()) == opts


def test_board_config_names_what_is_missing():
    with pytest.raises(UserError, match="lacks data"):
        BoardConfig.from_node_config({"bundle": "/b"})
    b = BoardConfig.from_node_config({"bundle": "/b", "data": "/d.npz", "profile": "jetson-orin-nano-8gb"})
    assert b.work_dir == "/b/fleet-board" and b.profile == "jetson-orin-nano-8gb"


def test_serve_refuses_bad_flags_and_no_tls(tmp_path, mlp_bundle):
    r = run_cli("fleet", "serve", mlp_bundle, "--rounds", "0")
    assert r.returncode == 2 and "--rounds" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run_cli("fleet", "serve", mlp_bundle, "--state-dir", tmp_path / "s", "--superlink", "127.0.0.1:1")
    assert r.returncode == 2 and "--root-certificates" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run_cli("fleet", "serve", tmp_path / "no-bundle", "--insecure")
    assert r.returncode == 2 and "bundle folder not found" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run_cli("fleet", "report", tmp_path / "nothing")
    assert r.returncode == 2 and "no committed fleet round" in r.stderr, r.stderr

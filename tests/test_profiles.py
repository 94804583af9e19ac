"""Device profiles: every shipped TOML loads and is sane; errors are UserErrors; the
TOML writer round-trips."""
import sys

import pytest

from taskedge.runtime.fsutil import UserError
from taskedge.runtime.profiles import (POWER_KEYS, TOP_KEYS, DeviceProfile, list_profiles,
                                       load_profile, profile_to_toml)

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

SHIPPED = ["desktop-nvidia-gpu", "host-cpu", "jetson-agx-orin-32gb", "jetson-agx-orin-64gb",
           "jetson-orin-nano-4gb", "jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-orin-nx-8gb"]


def without_path(d):
    return {k: v for k, v in d.items() if k != "path"}


def test_list_profiles_sorted_and_complete():
    assert [p.name for p in list_profiles()] == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_is_sane(name):
    p = load_profile(name)
    assert p.name == name
    text = open(p.path, encoding="utf-8").read()
    assert text.startswith("#"), "each profile names its source in a comment at the top"
    raw = tomllib.loads(text)
    assert set(raw) == set(TOP_KEYS) | {"power"} and set(raw["power"]) == set(POWER_KEYS)
    assert p.memory_mb >= 4096 and p.cpu_cores >= 2
    assert 0 < p.memory_share <= 1 and p.budget_mb == p.memory_mb * p.memory_share
    assert p.execution_providers[-1] == "CPUExecutionProvider"
    assert p.default_mode in p.modes and p.mode_watts() == p.modes[p.default_mode]
    assert 0 < p.idle_w < p.max_w and max(p.modes.values()) <= p.max_w
    assert p.energy_budget_j > 0
    if name.startswith("jetson"):
        assert p.shared_memory and p.sensor == "ina3221" and p.rails
        assert p.rails_glob == "/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*"
        assert "CUDAExecutionProvider" in p.execution_providers
        assert ("VDD_IN" in p.rails) == ("agx" not in name)  # AGX Orin has no VDD_IN
    else:
        assert not p.shared_memory
    if name == "host-cpu":
        assert p.execution_providers == ["CPUExecutionProvider"] and p.sensor == "none"
    if name == "desktop-nvidia-gpu":
        assert p.sensor == "nvml"


def test_unknown_name_lists_known_ones():
    with pytest.raises(UserError) as e:
        load_profile("jetson-tx2")
    msg = str(e.value)
    assert "jetson-tx2" in msg and "taskedge profiles" in msg
    assert all(n in msg for n in SHIPPED)


def test_unknown_mode_lists_modes():
    with pytest.raises(UserError) as e:
        load_profile("jetson-orin-nano-8gb").mode_watts("5W")
    assert "5W" in str(e.value) and "MAXN_SUPER" in str(e.value) and "15W" in str(e.value)


def test_load_by_path_and_missing_file(tmp_path):
    src = load_profile("host-cpu")
    f = tmp_path / "mine.toml"
    f.write_text(profile_to_toml(src.to_dict()))
    p = load_profile(f)
    assert p == src and p.path == str(f)
    assert load_profile(str(f)) == src
    with pytest.raises(UserError, match="not found"):
        load_profile(tmp_path / "nope.toml")


def test_malformed_toml_names_the_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('name = "x"\nmemory_mb = = 3\n')
    with pytest.raises(UserError) as e:
        load_profile(f)
    assert str(f) in str(e.value) and "TOML" in str(e.value)


@pytest.mark.parametrize("drop", ["cpu_cores", "power.sensor", "power.energy_budget_j"])
def test_missing_key_names_file_and_key(tmp_path, drop):
    d = without_path(load_profile("jetson-orin-nano-8gb").to_dict())
    table, _, key = drop.rpartition(".")
    del (d[table] if table else d)[key]
    f = tmp_path / "partial.toml"
    f.write_text(profile_to_toml(d))
    with pytest.raises(UserError) as e:
        load_profile(f)
    assert str(f) in str(e.value) and f"'{drop}'" in str(e.value)


@pytest.mark.parametrize("key,value", [("memory_mb", "8GB"), ("shared_memory", 1), ("memory_share", 1.5)])
def test_bad_values_are_user_errors(key, value):
    d = without_path(load_profile("jetson-orin-nano-8gb").to_dict())
    d[key] = value
    with pytest.raises(UserError, match=key):
        DeviceProfile.from_dict(d, "x.toml")


@pytest.mark.parametrize("name", SHIPPED)
def test_toml_round_trip(tmp_path, name):
    p = load_profile(name)
    text = profile_to_toml(p.to_dict(), comment="written by a test\nsecond line")
    assert text.startswith("# written by a test\n# second line\n")
    assert tomllib.loads(text) == without_path(p.to_dict())
    f = tmp_path / f"{name}.toml"
    f.write_text(text)
    assert load_profile(f) == p


def test_toml_writer_quotes_and_escapes():
    d = {"name": 'say "hi"\n\tback\\slash é', "n": -3, "x": 0.1, "ok": False, "empty": [],
         "big": float("inf"), "t": {"key with space": 1, "7W": 7, "inline": {"a b": "c", "d": 2.5}}}
    assert tomllib.loads(profile_to_toml(d)) == d

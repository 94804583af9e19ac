"""A real pack -> flash -> doctor -> adapt round trip over ssh to 127.0.0.1.

Starts Debian's OpenSSH server (`apt-get install -y openssh-server`) on a random port with a
temporary host key, a temporary client key and a temporary sshd_config; the "board" is a
prefix under tmp_path. The board venv is created from this interpreter with
--system-site-packages (its site-packages are inherited through a .pth file, since venvs do
not chain), so this venv's onnxruntime (provided by onnxruntime-training-cpu, run as a plain
inference build) is available without a network, and the runtime wheel is installed with
--no-deps. (Without --no-deps the installer would also keep that onnxruntime: test_pack.)
"""
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

from conftest import run_cli

SSHD = "/usr/sbin/sshd"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if not os.path.exists(SSHD):
        pytest.skip(f"{SSHD} not found: install it with `apt-get install -y openssh-server`")
    for tool in ("ssh", "scp", "ssh-keygen"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not found: install openssh-client")
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    port = _free_port()
    cfg = d / "sshd_config"
    cfg.write_text(f"""\
ListenAddress 127.0.0.1
Port {port}
HostKey {d / 'host_key'}
PidFile {d / 'sshd.pid'}
AuthorizedKeysFile {d / 'authorized_keys'}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
PrintMotd no
LogLevel ERROR
Subsystem sftp /usr/lib/openssh/sftp-server
""")
    log = open(d / "sshd.log", "w")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 10
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.skip(f"sshd exited at start: {(d / 'sshd.log').read_text()[-500:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.terminate()
        pytest.skip("sshd did not start listening within 10 s")
    import pwd
    user = pwd.getpwuid(os.getuid()).pw_name
    yield {"port": port, "key": d / "client_key", "target": f"{user}@127.0.0.1",
           "known_hosts": d / "known_hosts", "log": d / "sshd.log"}
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def ssh(s, *cmd, timeout=120):
    return subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new",
                           "-o", f"UserKnownHostsFile={s['known_hosts']}", "-i", str(s["key"]), "-p", str(s["port"]),
                           s["target"], *cmd], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def packed_tar(mlp_bundle, tmp_path_factory):
    tar = tmp_path_factory.mktemp("pack") / "bundle.tar"
    r = run_cli("pack", mlp_bundle, "--profile", "host-cpu", "-o", tar, "--json")
    assert r.returncode == 0, r.stderr
    return tar


def test_pack_flash_doctor_adapt(sshd, packed_tar, mlp_data, tmp_path):
    t0 = time.time()
    tar = packed_tar
    board = tmp_path / "board"  # the fake board's install prefix

    flash = ["flash", tar, sshd["target"], "--port", sshd["port"], "--identity", sshd["key"],
             "--prefix", board, "--python", sys.executable, "--no-deps", "--system-site-packages",
             "-o", f"UserKnownHostsFile={sshd['known_hosts']}", "--json"]
    r = run_cli(*flash, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr + sshd["log"].read_text()
    res = json.loads(r.stdout)
    doctor = res["doctor"]
    assert res["exit"] == 0 and doctor["ok"] and doctor["profile"] == "host-cpu"
    runtime = next(c for c in doctor["checks"] if c["name"] == "runtime")
    assert str(board / "venv") in runtime["detail"] and "torch-free" in runtime["detail"]
    assert (board / "release" / "bundle" / "manifest.json").is_file()
    assert (board / "incoming" / "bundle.tar").is_file() and not (board / "incoming" / "bundle.tar.part").exists()
    assert sshd["known_hosts"].read_text().strip()  # accept-new recorded the host key

    # copy task data to the board and adapt there, over ssh, with the installed runtime
    scp = subprocess.run(["scp", "-q", "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={sshd['known_hosts']}",
                          "-i", str(sshd["key"]), "-P", str(sshd["port"]), str(mlp_data / "train.npz"),
                          f"{sshd['target']}:{board}/train.npz"], capture_output=True, text=True)
    assert scp.returncode == 0, scp.stderr
    r = ssh(sshd, f"{board}/venv/bin/taskedge", "adapt", f"{board}/release/bundle", "--profile",
            f"{board}/release/profile.toml", "--data", f"{board}/train.npz", "--steps", "5", "--batch-size", "16",
            "--warmup", "1", "--run-dir", f"{board}/runs/r1", "--quiet", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert rep["steps"] == 5 and rep["stop_reason"] == "steps" and rep["profile"] == "host-cpu"
    last = rep["loss"]["last"]
    assert isinstance(last, float) and math.isfinite(last), last  # a recorded, finite loss (not None/NaN/inf)
    assert (board / "runs" / "r1" / "update.npz").is_file()

    # flashing again reuses the venv, replaces the release and keeps the runs
    r = run_cli(*flash[:-1], timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 fail" in r.stdout and (board / "runs" / "r1" / "update.npz").is_file()
    assert time.time() - t0 < 60


def test_flash_errors(sshd, packed_tar, tmp_path):
    r = run_cli("flash", tmp_path / "missing.tar", sshd["target"])
    assert r.returncode == 2 and "archive not found" in r.stderr
    (tmp_path / "x.tar").write_bytes(b"")          # checked here, never copied
    r = run_cli("flash", tmp_path / "x.tar", sshd["target"], "--port", _free_port())
    assert r.returncode == 2 and "nothing was copied to the board" in r.stderr
    r = run_cli("flash", packed_tar, sshd["target"], "--port", _free_port(), "--identity", sshd["key"],
                "-o", f"UserKnownHostsFile={sshd['known_hosts']}", timeout=60)
    assert r.returncode == 255 and "ssh to" in r.stderr


@pytest.mark.slow
def test_flash_task_packs_after_the_base(sshd, packed_tar, mlp_bundle, mlp_onnx, mlp_data, cnn_onnx, tmp_path):
    """The base goes over once (the full pack); a task pack after it sends only the task (issue 12);
    a task pack for a base the board lacks is refused on the board (exit 2, the fix named)."""
    from taskedge.export.config import ExportConfig
    from taskedge.export.exporter import export_bundle
    board = tmp_path / "board"
    common = [sshd["target"], "--port", sshd["port"], "--identity", sshd["key"], "--prefix", board,
              "-o", f"UserKnownHostsFile={sshd['known_hosts']}"]
    r = run_cli("flash", packed_tar, *common, "--python", sys.executable, "--no-deps", "--system-site-packages",
                timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (board / "store" / "tasks" / "default" / "manifest.json").is_file()     # install.sh stored the base
    export_bundle(ExportConfig(model=str(mlp_onnx), out=str(tmp_path / "b2"), calib=str(mlp_data / "test.npz"),
                               budget=0.1, num_classes=4, seed=2), log=lambda m: None)
    np.savez(tmp_path / "c.npz", pixels=np.random.default_rng(0).standard_normal((8, 1, 8, 8)).astype(np.float32))
    export_bundle(ExportConfig(model=str(cnn_onnx), out=str(tmp_path / "cnn"), calib=str(tmp_path / "c.npz"),
                               budget=0.1, num_classes=3), log=lambda m: None)
    for src, name in ((tmp_path / "b2", "four"), (tmp_path / "cnn", "cnn")):
        assert run_cli("task", "export", src, "-o", tmp_path / f"{name}.tar", "--name", name).returncode == 0
    with tarfile.open(tmp_path / "four.tar") as tar:
        assert "weights.bin" not in tar.getnames()                      # the base is not sent again
    r = run_cli("flash", tmp_path / "four.tar", *common, "--json", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["doctor"]["name"] == "four"
    r = ssh(sshd, f"{board}/venv/bin/taskedge", "tasks", "--store", f"{board}/store", "--json")
    assert [t["name"] for t in json.loads(r.stdout)["tasks"]] == ["default", "four"]
    r = run_cli("flash", tmp_path / "cnn.tar", *common, timeout=120)
    assert r.returncode == 2 and "is not on this board" in r.stderr and "taskedge flash" in r.stderr, r.stderr
    assert not (board / "store" / "tasks" / "cnn").exists()

"""A whole Flower federation on this machine, as real processes over loopback: one SuperLink and one
SuperNode per board, each with its own node config (bundle, data shard, profile), Flower home and
environment. For tests (tests/faults/test_fleet.py) and the experiment (tools/fleet_experiment.py).

    with LocalFleet(work_dir) as fleet:
        fleet.add_board(bundle, "shard0.npz", profile="jetson-orin-nano-8gb")   # x N
        fleet.start()
        fleet.serve(FleetOptions(...))       # `flwr run` via runtime/fleet/launch.py

On 127.0.0.1 only. Without `secure=True` (the fault tests): no TLS, any SuperNode may join. With it
(the experiment): TLS with a throw-away CA and SuperNode authentication, each board's key
registered with `flwr supernode register` before it starts. Every process is started in its own
session and stopped by its own process group id.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from taskedge.runtime.fleet import launch
from taskedge.runtime.fleet.options import FleetOptions

HOST = "127.0.0.1"
# Flower's SuperExec polls for work every second by default; a shorter poll starts each ServerApp and
# ClientApp process sooner (rounds of a small model are otherwise mostly waiting).
FAST_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


class LocalFleet:
    def __init__(self, work: Path, env: Optional[Dict[str, str]] = None, secure: bool = False):
        self.work = Path(work)
        self.secure = secure                   # TLS + SuperNode authentication (tools/fleet_certs.py)
        self.creds: Optional[dict] = None
        self.port = free_port()
        self.superlink = f"{HOST}:{self.port}"
        bin_dir = str(Path(sys.executable).parent)          # Flower starts its own helpers by name
        self.env = {**os.environ, **FAST_ENV, **(env or {}), "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
        self.boards: List[dict] = []
        self.procs: Dict[str, subprocess.Popen] = {}

    def add_board(self, bundle, data, profile: str = "host-cpu", env: Optional[Dict[str, str]] = None,
                  eval_data=None) -> str:
        name = f"board{len(self.boards)}"
        self.boards.append({"name": name, "bundle": str(Path(bundle).resolve()), "data": str(Path(data).resolve()),
                            "profile": profile, "env": env or {},
                            "eval_data": str(Path(eval_data).resolve()) if eval_data else ""})
        return name

    def _spawn(self, name: str, cmd: List[str], env: Dict[str, str]) -> subprocess.Popen:
        home = self.work / "homes" / name
        home.mkdir(parents=True, exist_ok=True)
        log = open(self.work / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd, env={**self.env, **env, "FLWR_HOME": str(home)}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=self.work)
        self.procs[name] = proc
        return proc

    def start_superlink(self, env: Optional[Dict[str, str]] = None) -> None:
        c = self.creds
        tls = ["--ssl-ca-certfile", str(c["ca"]), "--ssl-certfile", str(c["cert"]), "--ssl-keyfile", str(c["key"]),
               "--enable-supernode-auth"] if c else ["--insecure"]
        self._spawn("superlink", [_bin("flower-superlink"), *tls, "--disable-runtime-dependency-installation",
                                  "--host", HOST, "--port", str(self.port)], env or {})

    def register(self, i: int) -> None:
        """`flwr supernode register` of board i's public key: only registered boards may connect."""
        home = launch.write_connection(self.work / "homes" / "admin", self.superlink, False, str(self.creds["ca"]))
        r = subprocess.run([_bin("flwr"), "supernode", "register", str(self.creds["boards"][i][1]), launch.CONNECTION],
                           env={**self.env, "FLWR_HOME": str(home)}, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"flwr supernode register failed: {r.stdout[-500:]} {r.stderr[-500:]}")

    def start_board(self, i: int) -> None:
        board = self.boards[i]
        work_dir = self.work / board["name"]
        config = (f'bundle="{board["bundle"]}" data="{board["data"]}" profile="{board["profile"]}" '
                  f'work-dir="{work_dir}"' + (f' eval-data="{board["eval_data"]}"' if board["eval_data"] else ""))
        c = self.creds
        tls = ["--root-certificates", str(c["ca"]), "--auth-supernode-private-key", str(c["boards"][i][0])] if c \
            else ["--insecure"]
        self._spawn(board["name"], [_bin("flower-supernode"), *tls, "--superlink", self.superlink,
                                    "--host", HOST, "--port", str(free_port()), "--node-config", config],
                    board["env"])

    def start(self, timeout: float = 120.0) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        if self.secure:
            from taskedge.tools import fleet_certs
            self.creds = fleet_certs.make(self.work / "credentials", len(self.boards), HOST)
        self.start_superlink()
        if not self.secure:                    # no registration to wait for: start the boards alongside
            for i in range(len(self.boards)):
                self.start_board(i)
        deadline = time.time() + timeout
        while not self._listening():
            if time.time() > deadline or self.procs["superlink"].poll() is not None:
                raise RuntimeError(f"SuperLink did not come up on {self.superlink}; see {self.work}/superlink.log")
            time.sleep(0.2)
        if self.secure:
            for i in range(len(self.boards)):
                self.register(i)
                self.start_board(i)

    def _listening(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex((HOST, self.port)) == 0

    def serve(self, opts: FleetOptions, timeout: Optional[float] = None, stream: bool = True):
        """`flwr run` of the fleet app, its log captured (stream=False: return once submitted). The
        ServerApp runs in the SuperLink's environment, where a test sets its fault hooks."""
        return launch.run(opts, self.superlink, insecure=not self.creds, timeout=timeout, echo=False, stream=stream,
                          root_certificates=str(self.creds["ca"]) if self.creds else None)

    def stop(self, name: Optional[str] = None, sig=signal.SIGTERM) -> None:
        """Signal the process groups (all, or `name`'s), then wait for them; SIGKILL after 10 s."""
        procs = [self.procs.pop(k) for k in ([name] if name else list(self.procs))]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        deadline = time.time() + 10
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def __enter__(self) -> "LocalFleet":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

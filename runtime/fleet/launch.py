"""Start a fleet run on a SuperLink with Flower's own CLI (`flwr run`).

The Flower app is a folder holding only a pyproject.toml (written here): its components are this
package's ServerApp and ClientApp, so the SuperLink's host and every board need taskedge
installed, and the FAB carries no code. Its `[tool.flwr.app.config]` is FleetOptions with its
defaults; the run's values go in as `--run-config` (a TOML file). The SuperLink connection (address,
TLS root certificate or insecure) is a Flower configuration in STATE_DIR/flwr-home, so the user's
own ~/.flwr is left alone.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Optional

from ..fsutil import UserError, atomic_write_text
from .options import FleetOptions

APP_NAME = "taskedge-fleet"
CONNECTION = "taskedge"


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _table(values: dict) -> str:
    return "".join(f"{k} = {_toml(v)}\n" for k, v in values.items())


def write_app(folder: Path) -> Path:
    defaults = FleetOptions(bundle="-", state_dir="-").run_config()
    text = ("[build-system]\nrequires = [\"setuptools>=64\"]\nbuild-backend = \"setuptools.build_meta\"\n\n"
            f"[project]\nname = \"{APP_NAME}\"\nversion = \"1.0.0\"\n"
            "description = \"TaskEdge fleet: federated rounds of sparse updates\"\nlicense = \"MIT\"\n"
            "dependencies = []\n\n[tool.flwr.app]\npublisher = \"taskedge\"\n\n[tool.flwr.app.components]\n"
            "serverapp = \"taskedge.runtime.fleet.server:app\"\nclientapp = \"taskedge.runtime.fleet.client:app\"\n\n"
            "[tool.flwr.app.config]\n" + _table(defaults))
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "pyproject.toml", text)
    return folder


def write_connection(home: Path, superlink: str, insecure: bool, root_certificates: Optional[str]) -> Path:
    if not insecure and not root_certificates:
        raise UserError("the SuperLink connection needs TLS: give --root-certificates CA.pem (the CA that signed the "
                        "SuperLink's certificate), or --insecure on a test network")
    conn = {"address": superlink}
    conn.update({"insecure": True} if insecure else {"root-certificates": str(Path(root_certificates).resolve())})
    home.mkdir(parents=True, exist_ok=True)
    atomic_write_text(home / "config.toml", f"[superlink]\ndefault = \"{CONNECTION}\"\n\n"
                                            f"[superlink.{CONNECTION}]\n" + _table(conn))
    return home


def flwr_cli() -> str:
    here = Path(sys.executable).with_name("flwr")
    found = str(here) if here.is_file() else shutil.which("flwr")
    if not found:
        raise UserError("Flower's `flwr` command is not installed: pip install 'taskedge[fleet]'")
    return found


def run(opts: FleetOptions, superlink: str, insecure: bool = False, root_certificates: Optional[str] = None,
        timeout: Optional[float] = None, echo: bool = True, stream: bool = True) -> subprocess.CompletedProcess:
    """`flwr run` of the fleet app on the SuperLink, its log streamed until the ServerApp ends
    (stream=False: returns once the run is submitted)."""
    state_dir = Path(opts.state_dir)
    app = write_app(state_dir / "app")
    home = write_connection(state_dir / "flwr-home", superlink, insecure, root_certificates)
    config = state_dir / "run-config.toml"
    values = {f.name.replace("_", "-"): getattr(opts, f.name) for f in fields(opts)}
    values["bundle"], values["state-dir"] = str(Path(opts.bundle).resolve()), str(state_dir.resolve())
    values["eval-data"] = str(Path(opts.eval_data).resolve()) if opts.eval_data else ""
    atomic_write_text(config, _table(values))
    env = dict(os.environ, FLWR_HOME=str(home.resolve()))
    cmd = [flwr_cli(), "run", str(app), CONNECTION, "--run-config", str(config)] + (["--stream"] if stream else [])
    out = None if echo else subprocess.PIPE
    return subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if not echo else None, text=True,
                          timeout=timeout)

"""`taskedge flash bundle.tar user@host`: copy a pack to a board, install it, run the doctor.

The work is done by tools/flash.sh (plain bash + ssh/scp, so it also runs without Python on a
CI box); this module is its CLI front end. ssh runs with BatchMode=yes (keys only, never a
password prompt) and StrictHostKeyChecking=accept-new (a new board's key is recorded, a
changed one is refused).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from taskedge.runtime.flags import Check, arg_type
from taskedge.runtime.fsutil import UserError

PORT = Check(lambda v: 1 <= v <= 65535, "must be a TCP port, 1-65535")
# what reaches ssh's command line or the board's shell: no control characters, no option look-alike
TEXT = Check(lambda s: bool(s) and s.isprintable() and not s.startswith("-"),
             "must be non-empty printable text not starting with '-'")
# pip's console scripts start with a /bin/sh line that double-quotes the venv's python: a `$`, backquote,
# quote or backslash in the prefix runs as shell there (found by the fuzzing: --prefix 'x/$(touch y)')
PREFIX = Check(lambda s: TEXT.test(s) and re.fullmatch(r"[\w ./~+@,:=-]+", s) is not None,
               "must be a plain path: letters, digits, spaces and . / ~ + @ , : = - _ only")
TARGET = Check(lambda s: TEXT.test(s) and " " not in s and s.count("@") <= 1 and "" not in s.split("@"),
               "must be user@host or host (no spaces, not starting with '-')")
SSH_OPTION = Check(lambda s: s.isprintable() and re.fullmatch(r"[A-Za-z]+[ =]\S.*", s) is not None,
                   "must be an ssh option KEY=VALUE, e.g. UserKnownHostsFile=FILE")

SCRIPT = Path(__file__).with_name("flash.sh")


def flash_command(archive, target: str, port: int = 22, prefix: str = "~/taskedge",
                  identity: Optional[str] = None, python: str = "python3", no_deps: bool = False,
                  system_site_packages: bool = False, ssh_options: Optional[List[str]] = None,
                  json_out: bool = False) -> List[str]:
    if not SCRIPT.is_file():
        raise UserError(f"{SCRIPT} is missing from this install; run flash from a source checkout "
                        "(pip install -e .) or add tools/*.sh to the package data")
    if not Path(archive).is_file():
        raise UserError(f"archive not found: {archive} (make it with `taskedge pack BUNDLE --profile P -o FILE`)")
    if not TARGET.test(target):
        raise UserError(f"give the board as user@host, not {target!r}")
    task_pack = check_archive(archive)
    if identity and not Path(identity).expanduser().is_file():
        raise UserError(f"identity file not found: {identity}")
    for tool in ("bash", "ssh", "scp"):
        if not shutil.which(tool):
            raise UserError(f"{tool} not found on PATH; install openssh-client")
    cmd = ["bash", str(SCRIPT), "--port", str(port), "--prefix", prefix, "--python", python]
    if identity:
        cmd += ["--identity", str(Path(identity).expanduser())]
    if no_deps:
        cmd.append("--no-deps")
    if system_site_packages:
        cmd.append("--system-site-packages")
    for o in ssh_options or []:
        cmd += ["-o", o]
    if json_out:
        cmd.append("--json")
    if task_pack:
        cmd.append("--task-pack")
    return cmd + [str(archive), target]


def check_archive(archive) -> bool:
    """Refuse, before anything is copied, an archive that install.sh would refuse on the board:
    the same safe extraction and SHA256SUMS check (into a temp folder), and the installer members.
    True for a task pack (`taskedge task export`: only the task, added to the board's store)."""
    import tempfile
    from .pack import INSTALL, PROFILE, PackError, unpack
    with tempfile.TemporaryDirectory(prefix="taskedge-flash-check-") as tmp:
        try:
            unpack(archive, Path(tmp) / "x")
        except PackError as e:
            raise UserError(f"{e} (nothing was copied to the board)") from None
        root = Path(tmp) / "x"
        if (root / "task.json").is_file() and not (root / INSTALL).exists():
            return True
        missing = [m for m in (INSTALL, PROFILE, "installer/unpack.py", "bundle/manifest.json")
                   if not (root / m).is_file()] + ([] if any((root / "wheels").glob("taskedge-*.whl")) else ["wheels/"])
        if missing:
            raise UserError(f"{archive}: not a `taskedge pack` archive (no {', '.join(missing)}); make it with "
                            "`taskedge pack BUNDLE --profile P -o FILE` (nothing was copied to the board)")
    return False


def flash(archive, target: str, json_out: bool = False, timeout: Optional[float] = None, **kw) -> dict:
    """Run flash.sh; returns {"exit": rc, "doctor": report-or-text}. Progress streams to stderr."""
    cmd = flash_command(archive, target, json_out=json_out, **kw)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout)
    out = r.stdout
    doctor = out
    if json_out:
        try:
            doctor = json.loads(out)
        except ValueError:
            doctor = out
    return {"archive": str(archive), "target": target, "prefix": kw.get("prefix", "~/taskedge"),
            "exit": r.returncode, "doctor": doctor}


def cmd_flash(a) -> int:
    res = flash(a.archive, a.target, json_out=a.json, port=a.port, prefix=a.prefix, identity=a.identity,
                python=a.python, no_deps=a.no_deps, system_site_packages=a.system_site_packages,
                ssh_options=a.ssh_option)
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        sys.stdout.write(res["doctor"])
    return res["exit"]


def register(sub) -> None:
    f = sub.add_parser("flash", help="host: copy a pack to a board over ssh, install it, run the doctor",
                       description="scp ARCHIVE to the board, run its install.sh there (safe unpack, sha256 "
                                   "check, venv at --prefix, pip install of the runtime wheel, with the CPU "
                                   "onnxruntime unless the venv already has one), then "
                                   "`taskedge doctor` with the packed profile. Exit status: the doctor's "
                                   "(0/1), 3 if the copy or install failed, 255 if ssh failed. A task pack "
                                   "(`taskedge task export`) is only copied and added to the board's task store "
                                   "(PREFIX/store), its base flashed before; exit 2 if the board lacks the base.")
    f.add_argument("archive", help="the tar written by `taskedge pack` (checked here before it is copied)")
    f.add_argument("target", type=arg_type(str, TARGET), help="user@host of the board")
    f.add_argument("-p", "--port", type=arg_type(int, PORT), default=22, help="ssh port (default 22)")
    f.add_argument("--prefix", type=arg_type(str, PREFIX), default="~/taskedge",
                   help="install prefix on the board (default ~/taskedge)")
    f.add_argument("-i", "--identity", help="ssh private key file")
    f.add_argument("--python", type=arg_type(str, TEXT), default="python3",
                   help="python on the board used to create the venv")
    f.add_argument("--no-deps", action="store_true",
                   help="install the runtime wheel without dependencies or index (offline board whose "
                        "--python already has numpy, psutil and onnxruntime; use with --system-site-packages)")
    f.add_argument("--system-site-packages", action="store_true",
                   help="let the venv see --python's packages (e.g. NVIDIA's onnxruntime-gpu installed there; "
                        "the runtime is then installed without the CPU onnxruntime)")
    f.add_argument("-o", "--ssh-option", action="append", metavar="OPTION", type=arg_type(str, SSH_OPTION),
                   help="extra ssh/scp -o option, e.g. UserKnownHostsFile=FILE (repeatable)")
    f.add_argument("--json", action="store_true", help="print the result and the doctor's report as JSON")
    f.set_defaults(fn=cmd_flash)


if __name__ == "__main__":  # python -m taskedge.tools.flash ... (same flags)
    import argparse
    ap = argparse.ArgumentParser(prog="taskedge flash")
    register(ap.add_subparsers())
    ns = ap.parse_args(["flash"] + sys.argv[1:])
    try:
        sys.exit(ns.fn(ns))
    except UserError as e:
        sys.exit(f"taskedge flash: error: {e}")

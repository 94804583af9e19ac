"""pack / unpack / install.sh: a real bundle round trip, bad input, and archives that must be refused."""
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import run_cli
from taskedge.runtime.bundle import load_bundle
from taskedge.runtime.fsutil import UserError
from taskedge.runtime.profiles import load_profile
from taskedge.tools import unpack as extractor
from taskedge.tools.pack import installer_files, unpack


@pytest.fixture(scope="module")
def packed(mlp_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("pack") / "bundle.tar"
    r = run_cli("pack", mlp_bundle, "--profile", "jetson-orin-nano-8gb", "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout)


def test_pack_contents_and_roundtrip(packed, mlp_bundle, tmp_path):
    out, res = packed
    assert res["profile"] == "jetson-orin-nano-8gb" and res["wheel"].startswith("taskedge-0.1.0-")
    with tarfile.open(out) as tar:
        names = tar.getnames()
        assert names[0] == "SHA256SUMS"
        assert {"install.sh", "installer/unpack.py", "installer/fsutil.py", "profile.toml", "bundle/manifest.json",
                "bundle/step_model.onnx", "bundle/weights.bin", "wheels/" + res["wheel"]} <= set(names)
        assert tar.getmember("install.sh").mode & 0o111
        assert all(not n.startswith(("/", "..")) and not tar.getmember(n).issym() for n in names)
        sums = tar.extractfile("SHA256SUMS").read().decode().splitlines()
    assert len(sums) == len(names) - 1  # every member but SHA256SUMS itself

    dest = tmp_path / "release"
    info = unpack(out, dest)
    assert info["verified"] and info["files"] == len(names) - 1
    m = load_bundle(dest / "bundle")  # hashes verified again
    assert m.model_name == load_bundle(mlp_bundle).model_name
    assert load_profile(dest / "profile.toml").name == "jetson-orin-nano-8gb"
    # the installer members are the package's real files, byte for byte
    for name, src in installer_files().items():
        assert (dest / name).read_bytes() == src.read_bytes(), name
    # sha256sum -c compatible
    r = subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=dest, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # the wheel carries the runtime and the profiles, and install.sh is valid bash
    import zipfile
    with zipfile.ZipFile(dest / "wheels" / res["wheel"]) as z:
        wn = z.namelist()
        meta = z.read(next(n for n in wn if n.endswith(".dist-info/METADATA"))).decode()
    assert "taskedge/runtime/trainer.py" in wn and "taskedge/device_profiles/host-cpu.toml" in wn
    # every runtime module, those of its subpackages (runtime/train/) too: pyproject lists each package
    import taskedge.runtime
    runtime = Path(taskedge.runtime.__file__).resolve().parent
    missing = [f for f in (f"taskedge/runtime/{p.relative_to(runtime).as_posix()}" for p in runtime.rglob("*.py"))
               if f not in wn]
    assert "taskedge/runtime/train/session.py" in wn and not missing, missing
    # onnxruntime only through the [board] extra, so the installer can keep an onnxruntime-gpu
    ort_reqs = [ln for ln in meta.splitlines() if ln.startswith("Requires-Dist: onnxruntime")]
    assert any('extra == "board"' in ln for ln in ort_reqs) and all("extra ==" in ln for ln in ort_reqs), ort_reqs
    assert subprocess.run(["bash", "-n", str(dest / "install.sh")]).returncode == 0

    # unpacking again replaces the folder as a whole (a stray file goes); the CLI form works too
    (dest / "stray.txt").write_text("from before")
    r = run_cli("unpack", out, dest, "--json")
    assert r.returncode == 0, r.stderr
    again = json.loads(r.stdout)
    assert again["files"] == len(names) - 1 and again["dest"] == str(dest), again
    assert not (dest / "stray.txt").exists() and (dest / "bundle" / "manifest.json").is_file()


def run_install(tar, prefix, *opts):
    """The archive's install.sh, offline (no index, no find-links, no pip config), with this interpreter
    as the board's python."""
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PIP_FIND_LINKS", None)
    script = tarfile.open(tar).extractfile("install.sh").read().decode()
    return subprocess.run(["bash", "-s", "--", "--tar", str(tar), "--prefix", str(prefix), "--python", sys.executable,
                           *opts], input=script, env=env, capture_output=True, text=True, timeout=300)


def venv_dists(prefix):
    """Distribution names installed in the board venv's own site-packages (not inherited ones)."""
    return {d.name.split("-")[0].lower() for d in prefix.glob("venv/lib/python*/site-packages/*.dist-info")}


def test_install_sh_keeps_an_existing_onnxruntime(packed, tmp_path):
    # this venv's onnxruntime (from onnxruntime-training-cpu) is inherited: no [board] extra, nothing fetched
    out, res = packed
    board = tmp_path / "board"
    r = run_install(out, board, "--system-site-packages")
    assert r.returncode == 0, r.stderr
    assert "keeping the venv's onnxruntime" in r.stderr and "[board]" not in r.stderr
    assert "taskedge" in venv_dists(board) and not {"onnxruntime", "onnxruntime_gpu"} & venv_dists(board)
    r = subprocess.run([str(board / "venv/bin/taskedge"), "doctor", "--profile", "host-cpu", "--json"],
                       capture_output=True, text=True, timeout=120)
    checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert r.returncode == 0 and checks["onnxruntime"]["status"] == "ok", r.stdout + r.stderr


def test_install_sh_without_onnxruntime(packed, tmp_path):
    out, res = packed
    board = tmp_path / "board"
    # a bare venv has no onnxruntime: the installer asks pip for the [board] extra (fails offline here)
    r = run_install(out, board)
    assert r.returncode != 0 and f"installing {res['wheel']}[board]" in r.stderr, r.stderr
    # --no-deps installs the wheel alone, then names the missing onnxruntime in one line
    r = run_install(out, board, "--no-deps")
    assert r.returncode == 1 and "reusing venv" in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (f"install.sh: no onnxruntime in {board.resolve()}/venv: "
                                                 "run without --no-deps, or pass --ort-wheel PATH")


def test_pack_refuses_corrupted_bundle(mlp_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(mlp_bundle, b)
    with open(b / "eval_model.onnx", "ab") as f:
        f.write(b"\0")
    r = run_cli("pack", b, "--profile", "host-cpu", "-o", tmp_path / "x.tar")
    assert r.returncode == 2 and "sha256 mismatch" in r.stderr
    assert not (tmp_path / "x.tar").exists()
    r = run_cli("pack", mlp_bundle, "--profile", "no-such-board", "-o", tmp_path / "x.tar")
    assert r.returncode == 2 and "unknown device profile" in r.stderr


def one_line_error(r, *words):
    lines = r.stderr.strip().splitlines()
    return r.returncode == 2 and len(lines) == 1 and all(w in lines[0] for w in words)


def test_bad_input_is_one_line_and_writes_nothing(packed, mlp_bundle, tmp_path):
    out, _ = packed
    (tmp_path / "folder").mkdir()
    r = run_cli("pack", mlp_bundle, "--profile", "host-cpu", "-o", tmp_path / "folder")
    assert one_line_error(r, "not a folder", "-o"), r.stderr
    r = run_cli("pack", mlp_bundle, "--profile", "host-cpu", "-o", tmp_path / "x.tar", "--wheel", out)
    assert one_line_error(r, "not a taskedge-*.whl file", "drop --wheel"), r.stderr
    (tmp_path / "file").write_text("mine")
    r = run_cli("unpack", out, tmp_path / "file")
    assert one_line_error(r, "is not a folder"), r.stderr
    assert (tmp_path / "file").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"] and not any((tmp_path / "folder").iterdir())
    # install.sh with an archive that lacks the installer members
    junk = make_tar(tmp_path / "junk.tar", [f("a.txt")])
    r = subprocess.run(["bash", str(installer_files()["install.sh"]), "--tar", str(junk), "--prefix",
                        str(tmp_path / "board"), "--python", sys.executable], capture_output=True, text=True)
    assert r.returncode == 2 and "has no installer/unpack.py" in r.stderr, r.stderr
    assert not (tmp_path / "board" / "release").exists()


# --- hostile archives ---------------------------------------------------------------------

def _info(name, **kw):
    ti = tarfile.TarInfo(name)
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def make_tar(path, entries, sums=True):
    """entries: list of (TarInfo, bytes-or-None). Adds a correct SHA256SUMS for regular files."""
    with tarfile.open(path, "w") as tar:
        if sums:
            text = "".join(f"{hashlib.sha256(d).hexdigest()}  {ti.name}\n"
                           for ti, d in entries if d is not None and ti.isfile())
            ti = _info("SHA256SUMS", size=len(text))
            tar.addfile(ti, io.BytesIO(text.encode()))
        for ti, data in entries:
            if data is not None:
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
            else:
                tar.addfile(ti)
    return path


def f(name, data=b"x"):
    return (_info(name), data)


HOSTILE = {
    "absolute": [f("/tmp/taskedge-evil-abs")],
    "dotdot": [f("ok.txt"), f("../evil.txt")],
    "dotdot-nested": [f("a/../../evil.txt")],
    "symlink-abs": [(_info("link", type=tarfile.SYMTYPE, linkname="/etc/passwd"), None)],
    "symlink-up": [(_info("link", type=tarfile.SYMTYPE, linkname="../outside"), None)],
    "symlink-then-write-through": [(_info("d", type=tarfile.SYMTYPE, linkname="."), None),
                                   (_info("e", type=tarfile.SYMTYPE, linkname="d/.."), None),
                                   f("e/evil.txt")],
    "symlink-chain-escape": [(_info("sub", type=tarfile.DIRTYPE), None),
                             (_info("sub/l", type=tarfile.SYMTYPE, linkname="../x"), None),
                             (_info("x", type=tarfile.SYMTYPE, linkname=".."), None)],
    "hardlink-abs": [(_info("h", type=tarfile.LNKTYPE, linkname="/etc/passwd"), None)],
    "hardlink-up": [(_info("h", type=tarfile.LNKTYPE, linkname="../outside/file"), None)],
    "hardlink-to-symlink": [(_info("s", type=tarfile.SYMTYPE, linkname="ok"), None),
                            (_info("h", type=tarfile.LNKTYPE, linkname="s"), None)],
    "chardev": [(_info("null", type=tarfile.CHRTYPE, devmajor=1, devminor=3), None)],
    "blockdev": [(_info("sda", type=tarfile.BLKTYPE, devmajor=8, devminor=0), None)],
    "fifo": [(_info("pipe", type=tarfile.FIFOTYPE), None)],
    "duplicate": [f("a.txt", b"1"), f("a.txt", b"2")],
}


@pytest.fixture(scope="module")
def board_unpacker(tmp_path_factory):
    """installer/unpack.py with its fsutil.py next to it, as install.sh lays them out on the board."""
    d = tmp_path_factory.mktemp("installer")
    for name, src in installer_files().items():
        if name.startswith("installer/"):
            shutil.copy(src, d / name.split("/")[1])
    return d / "unpack.py"


@pytest.mark.parametrize("data_filter", [True, False], ids=["data-filter", "no-data-filter"])
@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_archives_are_refused(kind, data_filter, board_unpacker, tmp_path, monkeypatch):
    if not data_filter:  # as on a Python without PEP 706 (before 3.10.12 / 3.11.4): our checks alone
        monkeypatch.setattr(extractor, "DATA_FILTER", None)
    elif extractor.DATA_FILTER is None:
        pytest.skip("this Python has no tarfile.data_filter")
    base = tmp_path / "box"
    (base / "outside").mkdir(parents=True)
    (base / "outside" / "file").write_text("secret")
    tar = make_tar(tmp_path / f"{kind}.tar", HOSTILE[kind])
    dest = base / "target" / "release"
    with pytest.raises(UserError, match="refusing to unpack"):
        unpack(tar, dest)
    # no release and no staging folder left: the target's parent (made for the staging folder) is empty
    assert list((base / "target").iterdir()) == []
    assert sorted(p.name for p in base.iterdir()) == ["outside", "target"]
    assert not os.path.exists("/tmp/taskedge-evil-abs")
    assert (base / "outside" / "file").read_text() == "secret"
    assert not (base / "evil.txt").exists() and not (base / "target" / "evil.txt").exists()

    # the board's copy refuses it too: standalone, without site-packages (no taskedge, only its fsutil.py)
    r = subprocess.run([sys.executable, "-E", "-S", str(board_unpacker), str(tar), str(tmp_path / "emb")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unpack: refusing" in r.stderr, r.stdout + r.stderr
    assert not (tmp_path / "emb").exists()


def test_board_side_python_parses_as_python39():
    # installer/unpack.py and installer/fsutil.py run on the board's own Python (JetPack 6: 3.10; >= 3.9)
    import ast
    parsed = []
    for name, src in installer_files().items():
        if name.endswith(".py"):
            ast.parse(src.read_text(encoding="utf-8"), filename=name, feature_version=(3, 9))  # SyntaxError fails
            parsed.append(name.rsplit("/", 1)[-1])
    assert {"unpack.py", "fsutil.py"} <= set(parsed), parsed


@pytest.mark.skipif(not hasattr(tarfile, "FilterError"), reason="this Python has no PEP 706 filters")
def test_data_filter_is_consulted(tmp_path, monkeypatch):
    def refuse(member, dest):
        raise tarfile.FilterError(f"stub refuses {member.name}")
    monkeypatch.setattr(extractor, "DATA_FILTER", refuse)
    tar = make_tar(tmp_path / "ok.tar", [f("a.txt")])
    with pytest.raises(UserError, match="refused by tarfile's data filter: stub refuses"):
        unpack(tar, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_inside_links_are_allowed(tmp_path):
    tar = make_tar(tmp_path / "ok.tar", [f("dir/a.txt", b"hello"),
                                         (_info("dir/alias", type=tarfile.SYMTYPE, linkname="a.txt"), None),
                                         (_info("copy.txt", type=tarfile.LNKTYPE, linkname="dir/a.txt"), None)])
    # a hard link is a regular file after extraction: list it in SHA256SUMS as well
    with tarfile.open(tar) as t:
        members = [(m, t.extractfile(m).read() if m.isfile() else None) for m in t.getmembers()[1:]]
    text = (f"{hashlib.sha256(b'hello').hexdigest()}  dir/a.txt\n"
            f"{hashlib.sha256(b'hello').hexdigest()}  copy.txt\n")
    with tarfile.open(tar, "w") as t:
        t.addfile(_info("SHA256SUMS", size=len(text)), io.BytesIO(text.encode()))
        for m, d in members:
            t.addfile(m, io.BytesIO(d) if d is not None else None)
    dest = tmp_path / "out"
    assert unpack(tar, dest)["files"] == 2
    assert (dest / "dir" / "alias").is_symlink() and (dest / "dir" / "alias").read_text() == "hello"
    assert (dest / "copy.txt").read_text() == "hello" and not (dest / "copy.txt").is_symlink()


def test_sha256_mismatch_missing_and_extra_are_detected(packed, tmp_path):
    out, _ = packed
    with tarfile.open(out) as t:
        members = [(m, t.extractfile(m).read() if m.isfile() else None) for m in t.getmembers()]

    def rewrite(path, change):
        with tarfile.open(path, "w") as t:
            for m, d in members:
                m2, d2 = change(m, d)
                if m2 is None:
                    continue
                m2 = tarfile.TarInfo(m2.name) if m2 is not m else m
                if d2 is not None:
                    m2.size = len(d2)
                t.addfile(m2, io.BytesIO(d2) if d2 is not None else None)
        return path

    flipped = rewrite(tmp_path / "flip.tar", lambda m, d: (m, d[:-1] + bytes([d[-1] ^ 1]))
                      if m.name == "bundle/initial_state.npz" else (m, d))
    nosums = rewrite(tmp_path / "nosums.tar", lambda m, d: (None, None) if m.name == "SHA256SUMS" else (m, d))
    dropped = rewrite(tmp_path / "drop.tar", lambda m, d: (None, None) if m.name == "profile.toml" else (m, d))
    cases = {flipped: "sha256 mismatch for bundle/initial_state.npz", nosums: "SHA256SUMS is missing",
             dropped: "lists files the archive lacks: profile.toml"}
    extra = tmp_path / "extra.tar"
    with tarfile.open(extra, "w") as t:
        for m, d in members:
            t.addfile(m, io.BytesIO(d) if d is not None else None)
        t.addfile(_info("bundle/extra.onnx", size=3), io.BytesIO(b"abc"))
    cases[extra] = "does not list: bundle/extra.onnx"

    existing = tmp_path / "release"
    unpack(out, existing)  # a good release is in place
    before = sorted(p.relative_to(existing) for p in existing.rglob("*"))
    for tar, msg in cases.items():
        with pytest.raises(UserError) as e:
            unpack(tar, existing)
        assert msg in str(e.value), str(e.value)
        # the previous release is untouched, and no staging folder is left behind
        assert sorted(p.relative_to(existing) for p in existing.rglob("*")) == before
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".release")] == []
        r = run_cli("unpack", tar, tmp_path / "cli-out")
        assert r.returncode == 2 and "refusing to unpack" in r.stderr

    with pytest.raises(UserError, match="not a readable tar"):
        (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
        unpack(tmp_path / "junk.tar", tmp_path / "junk")

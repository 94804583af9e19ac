"""Safe extraction of a `taskedge pack` archive, checked against its SHA256SUMS.

    python3 unpack.py bundle.tar DEST        exit 0: unpacked and verified, 2: refused

It runs in two places, so it imports nothing but the standard library and fsutil (Python 3.9+):
  - on the board, from install.sh, before the runtime is installed: `taskedge pack` ships this file
    and runtime/fsutil.py as installer/unpack.py and installer/fsutil.py; install.sh copies both
    out of the tar into a temp folder and runs this one there (`import fsutil` finds its neighbour);
  - on the host as taskedge.tools.unpack (`taskedge unpack` and the tests, through pack.unpack).

Every member is checked before anything is written: no absolute names, no `..`, no links leaving
the target, no device files or FIFOs, no duplicates, no hard link to a symlink. Where the Python has
PEP 706's tarfile.data_filter (3.8.17+, 3.9.17+, 3.10.12+, 3.11.4+) each member must pass it as well;
where it lacks it (DATA_FILTER is None) these checks stand alone. They are the guarantee either way:
the filter itself has had escapes (CVE-2025-4517 and later fixes) that an older JetPack Python still
carries, and 3.10.12's filter wrongly refuses some relative symlinks (gh-107845; packs hold none).
Files are written by this code (O_EXCL, fsync), never by TarFile.extract, into a staging folder next
to DEST (fsutil.staged_dir) that replaces DEST only once SHA256SUMS matched.
"""
import os
import sys
import tarfile

if __package__:  # imported as taskedge.tools.unpack
    from taskedge.runtime.fsutil import fsync_dir, sha256_file, staged_dir
else:            # run as a script on the board, fsutil.py next to it
    from fsutil import fsync_dir, sha256_file, staged_dir

SUMS = "SHA256SUMS"
DATA_FILTER = getattr(tarfile, "data_filter", None)  # PEP 706; None on Pythons without it


class UnsafeArchive(Exception):
    """The archive is malformed, tampered with or tries to write outside its target."""


def _within(root, path):
    root = os.path.realpath(root)
    return os.path.commonpath([root, os.path.realpath(path)]) == root


def _member_name(m):
    """The normalised relative name of a member, or raise UnsafeArchive."""
    name = m.name
    if not name or "\x00" in name or "\\" in name:
        raise UnsafeArchive("member %r has an empty or unusual name" % (name,))
    if name.startswith("/") or os.path.isabs(name):
        raise UnsafeArchive("member %r has an absolute path" % (name,))
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive("member %r contains '..'" % (name,))
    return "/".join(parts)


def _check_link(name, m):
    """Links must be relative and stay inside the archive root, lexically; returns the target."""
    target = m.linkname
    if not target or "\x00" in target or target.startswith("/") or os.path.isabs(target):
        raise UnsafeArchive("link %r points to an absolute path %r" % (name, target))
    if m.issym():
        joined = os.path.normpath(os.path.join(os.path.dirname(name), target))
    else:  # hard link: linkname is another member's name, relative to the archive root
        joined = os.path.normpath(target)
    if joined == ".." or joined.startswith("../") or os.path.isabs(joined):
        raise UnsafeArchive("link %r -> %r leaves the target folder" % (name, target))
    return joined


def _check_member(m, name, dest, seen):
    """All checks on one member before it is written; returns its path under `dest`."""
    if name in seen:
        raise UnsafeArchive("member %r appears twice" % (name,))
    seen.add(name)
    if m.ischr() or m.isblk() or m.isfifo() or m.isdev():
        raise UnsafeArchive("member %r is a device or FIFO" % (name,))
    if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
        raise UnsafeArchive("member %r has an unsupported type %r" % (name, m.type))
    target = os.path.join(dest, name)
    if not _within(dest, os.path.dirname(target)):
        raise UnsafeArchive("member %r would be written through a link outside the target" % (name,))
    if os.path.lexists(target) and not (m.isdir() and os.path.isdir(target) and not os.path.islink(target)):
        raise UnsafeArchive("member %r would overwrite an earlier member" % (name,))
    if m.issym() or m.islnk():
        _check_link(name, m)
    if DATA_FILTER is not None:
        try:
            DATA_FILTER(m, dest)
        except tarfile.FilterError as e:
            raise UnsafeArchive("member %r refused by tarfile's data filter: %s" % (name, e))
    return target


def _extract(tar_path, dest):
    """Write every member of `tar_path` into the empty folder `dest`; returns the regular files written."""
    files, seen = [], set()
    with tarfile.open(tar_path, "r:*") as tar:
        for m in tar:
            name = _member_name(m)
            if not name:
                if m.isdir():
                    continue
                raise UnsafeArchive("member %r has no name" % (m.name,))
            target = _check_member(m, name, dest, seen)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if m.isdir():
                os.makedirs(target, mode=0o755, exist_ok=True)
            elif m.issym():
                os.symlink(m.linkname, target)
                if not _within(dest, target):
                    raise UnsafeArchive("symlink %r -> %r leaves the target folder" % (name, m.linkname))
            elif m.islnk():  # written as a copy of the earlier regular file
                src = os.path.join(dest, _check_link(name, m))
                if os.path.islink(src) or not os.path.isfile(src) or not _within(dest, src):
                    raise UnsafeArchive("hard link %r -> %r does not name an earlier file inside the archive"
                                        % (name, m.linkname))
                with open(src, "rb") as f:
                    _write(target, f, 0o644)
                files.append(name)
            else:
                _write(target, tar.extractfile(m), 0o755 if m.mode & 0o111 else 0o644)
                files.append(name)
    # a later symlink can turn an earlier, harmless one into an escape: check all of them at the end
    for dirpath, dirnames, filenames in os.walk(dest):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            if os.path.islink(p) and not _within(dest, p):
                raise UnsafeArchive("symlink %r leaves the target folder" % (os.path.relpath(p, dest),))
    return files


def _write(target, src, mode):
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    with os.fdopen(fd, "wb") as out:
        while True:
            block = src.read(1 << 20)
            if not block:
                break
            out.write(block)
        out.flush()
        os.fsync(out.fileno())


def _verify_sums(folder, files):
    """Every regular file but SHA256SUMS must be listed with the right sha256, and vice versa."""
    path = os.path.join(folder, SUMS)
    if not os.path.isfile(path) or os.path.islink(path):
        raise UnsafeArchive("%s is missing from the archive" % SUMS)
    listed = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            digest, sep, name = line.partition("  ")
            if not sep or len(digest) != 64:
                raise UnsafeArchive("%s line %d is malformed: %r" % (SUMS, i, line))
            listed[name.lstrip("*")] = digest.lower()
    present = set(files) - {SUMS}
    missing, extra = sorted(set(listed) - present), sorted(present - set(listed))
    if missing:
        raise UnsafeArchive("%s lists files the archive lacks: %s" % (SUMS, ", ".join(missing[:5])))
    if extra:
        raise UnsafeArchive("archive holds files %s does not list: %s" % (SUMS, ", ".join(extra[:5])))
    bad = [n for n in sorted(listed) if sha256_file(os.path.join(folder, n)) != listed[n]]
    if bad:
        raise UnsafeArchive("sha256 mismatch for %s (corrupted or modified after packing)" % ", ".join(bad[:5]))
    return len(listed)


def unpack(tar_path, dest):
    """Extract into a staging folder next to `dest`, verify SHA256SUMS, then rename it onto `dest`
    (an existing `dest` is replaced only then). Returns the number of verified files."""
    with staged_dir(dest) as stage:
        count = _verify_sums(str(stage), _extract(tar_path, str(stage)))
        for dirpath, _dirs, _files in os.walk(str(stage)):
            fsync_dir(dirpath)  # the new entries are on disk before the rename publishes them
    return count


def main(argv):
    if len(argv) != 2:
        print("usage: python3 unpack.py ARCHIVE DEST", file=sys.stderr)
        return 2
    try:
        n = unpack(argv[0], argv[1])
    except (UnsafeArchive, tarfile.TarError) as e:
        print("unpack: refusing %s: %s; re-create it with taskedge pack" % (argv[0], e), file=sys.stderr)
        return 2
    except OSError as e:
        print("unpack: cannot unpack %s into %s: %s" % (argv[0], argv[1], e), file=sys.stderr)
        return 1
    print("unpacked %s -> %s (%d files, sha256 verified)" % (argv[0], argv[1], n))
    if DATA_FILTER is None:
        print("unpack: note: this Python has no tarfile.data_filter (PEP 706, 3.10.12+); "
              "TaskEdge's own member checks guarded the extraction")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Operations that run ON an endpoint, against its adapter_dir (DESIGN §3).

This module is deliberately self-contained: standard library only, Python >= 3.8, no GNU or
BSD tools. LocalTransport calls `handle()` in-process; an SSH transport sends this file to
the endpoint's `python3` and calls the same `handle()` there. So macOS and Linux endpoints,
local and remote, run one implementation of every file operation.

Requests and responses are JSON: {"op": name, "args": {...}} →
{"ok": true, "result": ...} or {"ok": false, "error": {"kind", "message", "hint"}}.
"""

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import time

CHUNK = 4 * 1024 * 1024  # read size for hashing and copying: one pass per file
RELEASE_FILE = "RELEASE.json"
PARTIAL_DIR = ".rsync-partial"  # rsync --partial-dir: resumable pieces, never under a final name
STATUS_FILE = "status.json"
LOCK_FILE = ".adapterctl.lock"
STATE_DIR = ".adapterctl"  # in adapter_dir: journal.jsonl (one line per transaction record)
JOURNAL_FILE = "journal.jsonl"
JOURNAL_ROTATE_BYTES = 1 << 20  # a new transaction starts a fresh journal past this size
_RSYNC_TEMP = re.compile(r"^\.(.+)\.[A-Za-z0-9]{6}$")  # rsync's in-progress name for `name`
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_VERSION = re.compile(r"^cycle\d{1,6}_\d{8}_[0-9a-f]{8}$")

OPS = {}


class OpError(Exception):
    """A failed endpoint operation; `kind` lets the caller map it to a typed error."""

    def __init__(self, kind, message, hint=None, data=None):
        Exception.__init__(self, message)
        self.kind, self.message, self.hint, self.data = kind, message, hint, data


def op(fn):
    OPS[fn.__name__] = fn
    return fn


# -- small helpers, also imported by the training-box side -----------------------------------
def sha256_file(path, progress=None):
    """Hex sha256 of a file, streamed in large chunks (one read pass)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(CHUNK)
            if not block:
                break
            h.update(block)
            if progress:
                progress(len(block))
    return h.hexdigest()


def fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path, data):
    """Write to a temp name in the same directory, fsync, rename into place, fsync the dir."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, ".%s.%d.tmp" % (os.path.basename(path), os.getpid()))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(d)


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())


def read_json_file(path):
    """Parsed JSON, None when missing; OpError('corrupt') with line/column when unparsable."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        line, col = getattr(exc, "lineno", "?"), getattr(exc, "colno", "?")
        raise OpError(
            "corrupt",
            "%s is not valid JSON (line %s, column %s): %s" % (path, line, col, getattr(exc, "msg", exc)),
            "it was left untouched; repair or move it aside",
        ) from None


def symlink_swap(link, target):
    """Point `link` at `target` with one rename(2): never a moment without a valid link."""
    tmp = "%s.%d.swap" % (link, os.getpid())
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(os.path.dirname(os.path.abspath(link)))


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check(kind, value, pattern):
    if not isinstance(value, str) or not pattern.match(value) or ".." in value:
        raise OpError("invalid", "invalid %s %r" % (kind, value))
    return value


def _model_dir(adapter_dir, model):
    return os.path.join(adapter_dir, _check("model name", model, _NAME))


def _release_dir(adapter_dir, model, version):
    return os.path.join(_model_dir(adapter_dir, model), "releases", _check("version id", version, _VERSION))


def _staging_dir(adapter_dir, model, version):
    return os.path.join(
        _model_dir(adapter_dir, model), "staging", _check("version id", version, _VERSION) + ".tmp"
    )


def _link_target(adapter_dir, model, slot):
    """Version id an `active`/`previous` link points at, or None; ('?', raw) if foreign."""
    path = os.path.join(_model_dir(adapter_dir, model), slot)
    if not os.path.islink(path):
        return None if not os.path.exists(path) else "?"
    raw = os.readlink(path)
    parts = raw.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == "releases" and _VERSION.match(parts[-1]):
        return parts[-1]
    return "?"


def list_files(root):
    """Relative paths of the regular files under root (RELEASE.json excluded), sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != PARTIAL_DIR)
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel != RELEASE_FILE and not name.endswith(".partial"):
                out.append(rel)
    return sorted(out)


def file_stamp(path):
    """(size, mtime_ns, inode) of a file as one string: equal stamps mean the bytes were not rewritten."""
    st = os.stat(path)
    return "%d|%d|%d" % (st.st_size, st.st_mtime_ns, st.st_ino)


def hash_files(root):
    return {rel: sha256_file(os.path.join(root, rel)) for rel in list_files(root)}


def compare_files(expected, actual):
    """Human lines for every difference between two {file: sha} maps (empty = identical)."""
    problems = []
    for name in sorted(set(expected) | set(actual)):
        if name not in actual:
            problems.append("%s: missing" % name)
        elif name not in expected:
            problems.append("%s: unexpected file" % name)
        elif expected[name] != actual[name]:
            problems.append("%s: sha256 %s… expected %s…" % (name, actual[name][:12], expected[name][:12]))
    return problems


def copy_tree(src, dest, names, progress=None):
    """Local transfer of `names` (relative paths) from src into dest.

    Each file is written as `.name.partial`, fsynced and renamed, so an interrupted copy never
    leaves a truncated file under its final name. Returns (files_sent, bytes_sent).
    """
    os.makedirs(dest, exist_ok=True)
    nbytes = 0
    for rel in names:
        s, d = os.path.join(src, rel), os.path.join(dest, rel)
        os.makedirs(os.path.dirname(d), exist_ok=True)
        part = os.path.join(os.path.dirname(d), "." + os.path.basename(d) + ".partial")
        # an interrupted copy resumes where it stopped; the publish step re-hashes every byte
        have = os.path.getsize(part) if os.path.isfile(part) else 0
        if have > os.path.getsize(s):
            have = 0
        with open(s, "rb") as fi, open(part, "r+b" if have else "wb") as fo:
            fi.seek(have)
            fo.seek(have)
            fo.truncate()
            while True:
                block = fi.read(CHUNK)
                if not block:
                    break
                fo.write(block)
                nbytes += len(block)
                if progress:
                    progress(len(block))
            fo.flush()
            os.fsync(fo.fileno())
        os.replace(part, d)
    fsync_dir(dest)
    return len(names), nbytes


def _existing_ancestor(path):
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    return p


def _free_bytes(path):
    p = _existing_ancestor(path)
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize, os.access(p, os.W_OK) and os.path.isdir(p)


_GGUF_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}


def gguf_header(path):
    """The metadata of a GGUF file's header (arrays only by length), without reading tensors.

    Returns {"version", "tensors", "metadata": {key: value}}; raises ValueError for a non-GGUF file.
    """
    import struct

    def read(f, fmt):
        size = struct.calcsize(fmt)
        data = f.read(size)
        if len(data) != size:
            raise ValueError("truncated GGUF header")
        return struct.unpack(fmt, data)[0]

    def string(f):
        n = read(f, "<Q")
        if n > 1 << 24:
            raise ValueError("implausible string length %d in GGUF header" % n)
        return f.read(n).decode("utf-8", errors="replace")

    def value(f, vtype):
        if vtype in _GGUF_SCALARS:
            return read(f, _GGUF_SCALARS[vtype])
        if vtype == 8:
            return string(f)
        if vtype == 9:
            etype, count = read(f, "<I"), read(f, "<Q")
            if etype in _GGUF_SCALARS:
                f.seek(struct.calcsize(_GGUF_SCALARS[etype]) * count, 1)
            else:
                for _ in range(count):
                    value(f, etype)
            return {"array_of": etype, "length": count}
        raise ValueError("unknown GGUF value type %d" % vtype)

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        version = read(f, "<I")
        tensors, kvs = read(f, "<Q"), read(f, "<Q")
        meta = {}
        for _ in range(kvs):
            key = string(f)
            meta[key] = value(f, read(f, "<I"))
    return {"version": version, "tensors": tensors, "metadata": meta}


BASE_GGUF_HASHES = ".base-gguf-hashes.json"  # in adapter_dir: base GGUF sha256 by (path, size, mtime, inode)


def gguf_facts(path, adapter_dir=None):
    """sha256, size and the model-shape keys of a base GGUF on the endpoint (for GGUF LoRA checks).

    The sha256 comes from `adapter_dir`'s hash cache when the file's size, mtime and inode are the
    recorded ones (`sha256_cached`); otherwise it is computed (seconds per GB) and `stamp` says what
    `remember_base_gguf` records after a deploy. Reads only."""
    if not os.path.isfile(path):
        return {"exists": False, "path": path}
    stamp = file_stamp(path)
    known = {}
    if adapter_dir:
        try:
            known = read_json_file(os.path.join(adapter_dir, BASE_GGUF_HASHES)) or {}
        except OpError:
            known = {}
    entry = known.get(path) or {}
    cached = entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str)
    sha = entry["sha256"] if cached else sha256_file(path)
    out = {"exists": True, "path": path, "size": os.path.getsize(path), "sha256": sha}
    out.update(sha256_cached=cached, stamp=stamp)
    try:
        meta = gguf_header(path)["metadata"]
    except ValueError as exc:
        out["error"] = str(exc)
        return out
    arch = meta.get("general.architecture")
    tokens = meta.get("tokenizer.ggml.tokens")
    out["architecture"] = arch
    out["name"] = meta.get("general.name")
    out["embedding_length"] = meta.get("%s.embedding_length" % arch)
    out["block_count"] = meta.get("%s.block_count" % arch)
    out["vocab_size"] = tokens.get("length") if isinstance(tokens, dict) else None
    return out


# -- operations -------------------------------------------------------------------------------
@op
def facts(adapter_dir, models, pidfile=None, compat_links=None, loaded_file=None, base_gguf=None):
    """Everything the planner needs to know about an endpoint, read without writing."""
    free, writable = _free_bytes(adapter_dir)
    out = {
        "adapter_dir_exists": os.path.isdir(adapter_dir),
        "parent_exists": os.path.isdir(os.path.dirname(os.path.abspath(adapter_dir))),
        "writable": writable,
        "free_bytes": free,
        "python": sys.version.split()[0],
        "platform": sys.platform,
        "lock": None,
        "status": None,
        "status_error": None,
        "models": {},
        "pid": None,
        "compat": {},
        "loaded": None,
        "problem": None,
    }
    anc = _existing_ancestor(adapter_dir)
    if not os.path.isdir(anc):
        out["problem"] = "%s is not a directory, so adapter_dir %s cannot be created there" % (
            anc,
            adapter_dir,
        )
        models = []
    try:
        out["status"] = read_json_file(os.path.join(adapter_dir, STATUS_FILE)) if not out["problem"] else None
    except OpError as exc:
        out["status_error"] = exc.message
    out["lock"] = None if out["problem"] else read_lock(adapter_dir)
    out["journal"] = None if out["problem"] else journal_open(adapter_dir)
    for model in models:
        mdir = _model_dir(adapter_dir, model)
        releases = []
        rdir = os.path.join(mdir, "releases")
        for name in sorted(os.listdir(rdir)) if os.path.isdir(rdir) else []:
            if not _VERSION.match(name):
                continue
            try:
                meta = read_json_file(os.path.join(rdir, name, RELEASE_FILE))
            except OpError:
                meta = None
            releases.append(
                {
                    "version_id": name,
                    "complete": bool(meta),
                    "files": (meta or {}).get("files", {}),
                    "created": (meta or {}).get("created"),
                    "format": (meta or {}).get("format"),  # what convert made: adapter, merged, lora, peft...
                    "quant": ((meta or {}).get("artifact") or {}).get("quant"),
                    "mtime": os.stat(os.path.join(rdir, name)).st_mtime,
                }
            )
        sdir = os.path.join(mdir, "staging")
        staging = {}
        for n in sorted(os.listdir(sdir)) if os.path.isdir(sdir) else []:
            if n.endswith(".tmp") and _VERSION.match(n[:-4]) and os.path.isdir(os.path.join(sdir, n)):
                staging[n[:-4]] = _staged_sizes(os.path.join(sdir, n))
        out["models"][model] = {
            "active": _link_target(adapter_dir, model, "active"),
            "previous": _link_target(adapter_dir, model, "previous"),
            "releases": releases,
            "staging": staging,
        }
    if pidfile:
        out["pid"] = check_pidfile(pidfile)
    if base_gguf:
        out["base_gguf"] = gguf_facts(base_gguf, adapter_dir)
    if loaded_file:
        try:
            out["loaded"] = read_json_file(loaded_file)
        except OpError as exc:
            out["loaded"] = {"ok": False, "error": exc.message}
    for link, _target in (compat_links or {}).items():
        if os.path.islink(link):
            out["compat"][link] = {"state": "link", "target": os.readlink(link)}
        elif os.path.exists(link):
            out["compat"][link] = {"state": "other", "target": None}
        else:
            out["compat"][link] = {"state": "missing", "target": None}
    return out


def _piece_base(name):
    """The file name an in-progress piece is for (`.name.partial` of a local copy, rsync's
    `.name.XXXXXX`), or None for any other name."""
    if name.startswith(".") and name.endswith(".partial"):
        return name[1 : -len(".partial")]
    m = _RSYNC_TEMP.match(name)
    return m.group(1) if m else None


def _staged_sizes(path):
    """{rel: size} of what a staging dir holds; resumable pieces as "partial:rel" (for the plan)."""
    sizes = {}
    for dirpath, _dirs, filenames in os.walk(path):
        for name in filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, path)
            if rel.startswith(PARTIAL_DIR + os.sep):
                rel = "partial:" + rel[len(PARTIAL_DIR) + 1 :]
            elif name.startswith("."):
                base = _piece_base(name)
                if base is None:
                    continue
                rel = "partial:" + os.path.normpath(os.path.join(os.path.dirname(rel), base))
            with contextlib.suppress(OSError):
                sizes[rel] = max(sizes.get(rel, 0), os.path.getsize(full))
    return sizes


def _piece_of(name, reldir, files):
    """The expected file an in-progress piece belongs to, or None."""
    base = _piece_base(name)
    rel = os.path.normpath(os.path.join(reldir, base)) if base else None
    return rel if rel in files else None


def _adopt_pieces(path, files):
    """Tidy a staging dir left by an interrupted transfer so the next one resumes from it.

    A local copy's `.name.partial` stays where it is (copy_tree appends to it); rsync's in-progress
    file (`.name.XXXXXX`, left when its receiver was killed) moves into the partial dir, where a
    delta transfer continues from it. Anything else that is not an expected file is removed.
    Returns how many resumable pieces there are."""
    pieces = 0
    for dirpath, dirnames, filenames in os.walk(path, topdown=True):
        dirnames[:] = [d for d in dirnames if d != PARTIAL_DIR]
        reldir = os.path.relpath(dirpath, path)
        for name in filenames:
            full = os.path.join(dirpath, name)
            if os.path.normpath(os.path.join(reldir, name)) in files:
                continue
            owner = _piece_of(name, reldir, files)
            if owner is not None and name.endswith(".partial"):
                pieces += 1
                continue
            keep = os.path.join(path, PARTIAL_DIR, owner) if owner else None
            if keep and (not os.path.isfile(keep) or os.path.getsize(keep) < os.path.getsize(full)):
                os.makedirs(os.path.dirname(keep), exist_ok=True)
                os.replace(full, keep)
            else:
                os.unlink(full)
    pdir = os.path.join(path, PARTIAL_DIR)
    for dirpath, _dirs, filenames in os.walk(pdir):
        for name in filenames:
            if os.path.relpath(os.path.join(dirpath, name), pdir) in files:
                pieces += 1
            else:
                os.unlink(os.path.join(dirpath, name))
    return pieces


def _basis_ok(src_dir, rel, sha, stamps, rehash):
    """Whether release file `rel` still holds `sha`: its stamp unchanged since publish, or re-hashed."""
    full = os.path.join(src_dir, rel)
    if not os.path.isfile(full) or os.path.islink(full):
        return False
    if not rehash and stamps.get(rel) is not None and stamps.get(rel) == file_stamp(full):
        return True
    return sha256_file(full) == sha


@op
def prepare_staging(adapter_dir, model, version, files=None, link_from=None, drop_partial=False, rehash=()):
    """Create (or keep, for resuming) staging/{id}.tmp and fill in what needs no transfer.

    Files whose sha256 equals the same file of release `link_from` are hard-linked from there, but
    only when that copy is known to be intact: its (size, mtime, inode) stamp is the one recorded at
    publish, or it is re-hashed now (always for names in `rehash`); a damaged copy is sent fresh.
    Files already complete in staging (an interrupted run) are kept after a hash check; pieces of
    an interrupted transfer are kept for rsync to continue (`drop_partial` removes them: a delta
    against the previous release must not start from a partial file).
    Returns {'path', 'linked', 'kept', 'send', 'damaged', 'pieces'}.
    """
    path = _staging_dir(adapter_dir, model, version)
    os.makedirs(path, exist_ok=True)
    files = files or {}
    if drop_partial and os.path.isdir(os.path.join(path, PARTIAL_DIR)):
        shutil.rmtree(os.path.join(path, PARTIAL_DIR))
    pieces = _adopt_pieces(path, files)
    known, stamps, src_dir = {}, {}, None
    if link_from:
        src_dir = _release_dir(adapter_dir, model, link_from)
        try:
            meta = read_json_file(os.path.join(src_dir, RELEASE_FILE)) or {}
        except OpError:
            meta = {}
        known, stamps = meta.get("files", {}), meta.get("stamps", {})
    linked, kept, send, damaged = [], [], [], []
    for rel in sorted(files):
        dest = os.path.join(path, rel)
        if os.path.isfile(dest) and not os.path.islink(dest) and sha256_file(dest) == files[rel]:
            kept.append(rel)
        elif known.get(rel) == files[rel] and _basis_ok(src_dir, rel, files[rel], stamps, rel in rehash):
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            if os.path.lexists(dest):
                os.unlink(dest)
            os.link(os.path.join(src_dir, rel), dest)
            linked.append(rel)
        else:
            if known.get(rel) == files[rel]:
                damaged.append(rel)
            if os.path.lexists(dest):
                os.unlink(dest)
            send.append(rel)
    return {"path": path, "linked": linked, "kept": kept, "send": send, "damaged": damaged, "pieces": pieces}


@op
def remember_base_gguf(adapter_dir, path, stamp, sha256):
    """Record a base GGUF's sha256 under its (size, mtime, inode) stamp, if the file still has it."""
    if not os.path.isfile(path) or file_stamp(path) != stamp:
        return False
    cache = os.path.join(adapter_dir, BASE_GGUF_HASHES)
    try:
        known = read_json_file(cache) or {}
    except OpError:  # a damaged cache is only a cache: start it again
        known = {}
    known[path] = {"stamp": stamp, "sha256": sha256}
    atomic_write_json(cache, known)
    return True


@op
def remove_staging(adapter_dir, model, version):
    path = _staging_dir(adapter_dir, model, version)
    if os.path.isdir(path):
        shutil.rmtree(path)
    return path


@op
def finalize_release(adapter_dir, model, version, files, meta):
    """Hash every staged file here, compare with `files`, then rename staging → releases/{id}.

    Mismatching files are deleted from staging so a rerun sends them again.
    """
    staging = _staging_dir(adapter_dir, model, version)
    release = _release_dir(adapter_dir, model, version)
    actual = hash_files(staging)
    problems = compare_files(files, actual)
    if problems:
        bad = [name for name in files if actual.get(name) not in (None, files[name])]
        for name in bad:
            os.unlink(os.path.join(staging, name))
        raise OpError(
            "hash_mismatch",
            "staged copy of %s %s does not match the manifest: %s" % (model, version, "; ".join(problems)),
            "the bad files were removed from staging; rerun the deploy to send them again",
            data={"bad": bad},
        )
    if os.path.isdir(os.path.join(staging, PARTIAL_DIR)):
        shutil.rmtree(os.path.join(staging, PARTIAL_DIR))
    for rel in files:
        os.chmod(os.path.join(staging, rel), 0o444)  # releases are immutable (chmod moves ctime only)
    stamps = {rel: file_stamp(os.path.join(staging, rel)) for rel in files}
    doc = dict(meta, schema=1, model=model, version_id=version, files=files, stamps=stamps)
    atomic_write_json(os.path.join(staging, RELEASE_FILE), doc)
    os.makedirs(os.path.dirname(release), exist_ok=True)
    if os.path.isdir(release):
        shutil.rmtree(staging)
        return verify_release(adapter_dir, model, version, files)
    os.rename(staging, release)
    fsync_dir(os.path.dirname(release))
    return {"path": release, "files": len(files)}


@op
def verify_release(adapter_dir, model, version, files):
    """Re-hash an existing release on the endpoint and compare with the manifest."""
    release = _release_dir(adapter_dir, model, version)
    if not os.path.isdir(release):
        raise OpError("missing", "release %s of %s does not exist on the endpoint" % (version, model))
    problems = compare_files(files, hash_files(release))
    if problems:
        raise OpError(
            "hash_mismatch",
            "release %s of %s on the endpoint is damaged: %s" % (version, model, "; ".join(problems)),
            "remove %s and deploy again" % release,
        )
    return {"path": release, "files": len(files)}


@op
def swap_links(adapter_dir, model, active, previous):
    """Set `previous` then `active` (version ids, or None to remove) with rename(2) each.

    Both targets are checked before either link moves. Returns the targets they had before.
    """
    mdir = _model_dir(adapter_dir, model)
    old = {
        "active": _link_target(adapter_dir, model, "active"),
        "previous": _link_target(adapter_dir, model, "previous"),
    }
    wanted = (("previous", previous), ("active", active))
    for slot, version in wanted:
        link = os.path.join(mdir, slot)
        if os.path.lexists(link) and not os.path.islink(link):
            raise OpError("invalid", "%s exists and is not a symlink" % link, "move it aside and retry")
        if version is not None and not os.path.isfile(
            os.path.join(_release_dir(adapter_dir, model, version), RELEASE_FILE)
        ):
            raise OpError("missing", "release %s of %s is not complete on the endpoint" % (version, model))
    for slot, version in wanted:
        link = os.path.join(mdir, slot)
        if version is None:
            if os.path.lexists(link):
                os.unlink(link)
        else:
            symlink_swap(link, "releases/" + version)
    return old


@op
def set_compat_link(link, target, root):
    """Point a backward-compatibility link (e.g. fine_tuned_gemma_mi_A) at `target`."""
    root = os.path.abspath(root)
    if not os.path.abspath(link).startswith(root + os.sep):
        raise OpError("invalid", "compat link %s is outside %s" % (link, root))
    if os.path.lexists(link) and not os.path.islink(link):
        raise OpError(
            "invalid",
            "%s exists and is not a symlink" % link,
            "move the old directory aside (e.g. to %s.orig) so adapterctl can replace it with a link" % link,
        )
    os.makedirs(os.path.dirname(link), exist_ok=True)
    symlink_swap(link, target)
    return link


@op
def check_pidfile(pidfile):
    """{'pid', 'alive', 'error'} for a pidfile; never raises for a missing/dead pid."""
    try:
        with open(pidfile) as f:
            text = f.read().strip()
    except OSError as exc:
        return {"pid": None, "alive": False, "error": "cannot read pidfile %s: %s" % (pidfile, exc.strerror)}
    if not text.isdigit():
        return {
            "pid": None,
            "alive": False,
            "error": "pidfile %s does not hold a pid (%r)" % (pidfile, text[:40]),
        }
    pid = int(text)
    alive = pid_alive(pid)
    return {
        "pid": pid,
        "alive": alive,
        "error": None if alive else "pid %d from %s is not running" % (pid, pidfile),
    }


@op
def signal_pidfile(pidfile, signame="SIGUSR1"):
    """Send `signame` to the pid in `pidfile`; OpError('no_process') if missing or dead."""
    state = check_pidfile(pidfile)
    if not state["alive"]:
        raise OpError("no_process", state["error"], "start the serving process, or set reload_method: none")
    os.kill(state["pid"], getattr(signal, signame))
    return state["pid"]


def service_manager(manager=None):
    """The service manager of this endpoint: launchctl on macOS, systemctl elsewhere."""
    return manager or ("launchctl" if sys.platform == "darwin" else "systemctl")


def restart_argv(unit, manager=None):
    """argv that restarts `unit`: `systemctl restart UNIT` or `launchctl kickstart -k TARGET`.

    A launchd label without a domain (`com.adapterctl.serve`) means the caller's GUI domain,
    `gui/<uid>/<label>`; a full service target (`system/<label>`) is used as given.
    """
    if not isinstance(unit, str) or not unit or unit.startswith("-") or any(c.isspace() for c in unit):
        raise OpError("invalid", "invalid service unit %r" % (unit,))
    manager = service_manager(manager)
    if manager == "launchctl":
        target = unit if "/" in unit else "gui/%d/%s" % (os.getuid(), unit)
        return ["launchctl", "kickstart", "-k", target]
    if manager == "systemctl":
        return ["systemctl", "restart", unit]
    raise OpError("invalid", "unknown service manager %r (systemctl or launchctl)" % (manager,))


@op
def restart_service(unit, manager=None, timeout_s=30.0):
    """Restart a service with the endpoint's service manager (found on PATH), bounded by timeout_s.

    Never raises for a failed restart: returns {'argv', 'rc', 'stderr', 'stdout'}; rc is None
    when the command timed out, 127 when the manager is not installed.
    """
    import subprocess

    argv = restart_argv(unit, manager)
    try:
        # stdin closed and output captured: over SSH this process's stdio is the op channel
        proc = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=float(timeout_s)
        )
    except FileNotFoundError:
        return {"argv": argv, "rc": 127, "stdout": "", "stderr": "%s: command not found on PATH" % argv[0]}
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        return {
            "argv": argv,
            "rc": None,
            "stdout": "",
            "stderr": (err + "\n" if err else "") + "timed out after %g s" % float(timeout_s),
        }
    return {"argv": argv, "rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


@op
def read_json(path):
    return read_json_file(path)


@op
def update_status(adapter_dir, endpoint, model, fields, now):
    """Merge `fields` into status.json's entry for `model` (caller holds the endpoint lock)."""
    path = os.path.join(adapter_dir, STATUS_FILE)
    doc = read_json_file(path) or {"schema": 1, "endpoint": endpoint, "models": {}}
    entry = doc.setdefault("models", {}).setdefault(_check("model name", model, _NAME), {})
    entry.update(fields)
    doc["updated"] = now
    os.makedirs(adapter_dir, exist_ok=True)
    atomic_write_json(path, doc)
    return doc


def read_lock(adapter_dir):
    """The endpoint lock as found: None when free, else {'state', 'holder', 'raw_sha', 'preview', 'age_s',
    'size'}; state is `held` (a JSON holder), `empty`, `binary` or `garbage` (unparsable text)."""
    path = os.path.join(adapter_dir, LOCK_FILE)
    try:
        with open(path, "rb") as f:
            raw = f.read(65536)
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return None
    except OSError as exc:
        return {
            "state": "unreadable",
            "holder": None,
            "raw_sha": None,
            "size": None,
            "age_s": 0.0,
            "preview": exc.strerror or str(exc),
        }
    holder, state = None, "held"
    if not raw.strip():
        state = "empty"
    else:
        try:
            text = raw.decode("utf-8")
            if any(c < " " and c not in "\t\r\n" for c in text):
                raise UnicodeDecodeError("utf-8", raw, 0, 1, "control characters")
            holder = json.loads(text)
        except UnicodeDecodeError:
            state = "binary"
        except ValueError:
            state = "garbage"
        if state == "held" and not (isinstance(holder, dict) and holder.get("pid") and holder.get("host")):
            state, holder = "garbage", None
    return {
        "state": state,
        "holder": holder,
        "raw_sha": hashlib.sha256(raw).hexdigest(),
        "size": len(raw),
        "age_s": age,
        "preview": raw[:60].decode("utf-8", "replace") if state != "binary" else raw[:16].hex(),
    }


@op
def lock_acquire(adapter_dir, holder, break_sha=None):
    """Take .adapterctl.lock: the holder is written to a temp file, fsynced, then link(2)ed into place,
    so the lock appears with its whole content or not at all.

    `break_sha`: the sha256 of the lock content the caller decided to break; only a lock with exactly
    that content is removed, so two breakers cannot both win.
    Returns {'acquired', 'lock' (read_lock of the lock found, when not acquired), 'broken'}.
    """
    os.makedirs(adapter_dir, exist_ok=True)
    path = os.path.join(adapter_dir, LOCK_FILE)
    tmp = "%s.%d.%s.new" % (path, os.getpid(), hashlib.sha256(os.urandom(8)).hexdigest()[:8])
    atomic_write_bytes(tmp, (json.dumps(holder, sort_keys=True) + "\n").encode())
    broken = None
    try:
        for _attempt in range(3):
            try:
                os.link(tmp, path)
            except FileExistsError:
                found = read_lock(adapter_dir)
                if found is None:
                    continue  # released meanwhile
                if break_sha is not None and found["raw_sha"] == break_sha and broken is None:
                    os.unlink(path)
                    broken = found
                    continue
                return {"acquired": False, "lock": found, "broken": broken}
            fsync_dir(adapter_dir)
            return {"acquired": True, "lock": None, "broken": broken}
        return {"acquired": False, "lock": read_lock(adapter_dir), "broken": broken}
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


@op
def lock_release(adapter_dir, deployment_id):
    """Remove the lock if this deployment holds it."""
    path = os.path.join(adapter_dir, LOCK_FILE)
    found = read_lock(adapter_dir)
    if found and (found["holder"] or {}).get("deployment_id") == deployment_id:
        os.unlink(path)
        fsync_dir(adapter_dir)
        return True
    return False


# -- the journal (DESIGN §9) ------------------------------------------------------------------
def _journal_path(adapter_dir):
    return os.path.join(adapter_dir, STATE_DIR, JOURNAL_FILE)


def _journal_records(adapter_dir):
    """Every record of the journal in order; a torn last line (a kill mid-write) is skipped."""
    try:
        with open(_journal_path(adapter_dir), "rb") as f:
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            rec = json.loads(line.decode("utf-8")) if line.strip() else None
        except ValueError:
            rec = None
        if isinstance(rec, dict) and rec.get("t") and rec.get("txn"):
            out.append(rec)
    return out


@op
def journal_open(adapter_dir):
    """The records of the newest transaction that began and neither committed nor aborted, or None."""
    records = _journal_records(adapter_dir)
    ended = {r["txn"] for r in records if r["t"] in ("commit", "abort")}
    begun = [r["txn"] for r in records if r["t"] == "begin" and r["txn"] not in ended]
    if not begun:
        return None
    return [r for r in records if r["txn"] == begun[-1]]


@op
def journal_append(adapter_dir, records):
    """Append records to the journal: one write(2) and one fsync for them all. A `begin` on a journal
    past JOURNAL_ROTATE_BYTES with nothing open rotates it to journal.1.jsonl first."""
    path = _journal_path(adapter_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if (
        records
        and records[0].get("t") == "begin"
        and os.path.isfile(path)
        and os.path.getsize(path) > JOURNAL_ROTATE_BYTES
        and journal_open(adapter_dir) is None
    ):
        os.replace(path, path[: -len(".jsonl")] + ".1.jsonl")
    data = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(records)


# -- leftovers (doctor, gc) -------------------------------------------------------------------
def tree_size(path):
    """Bytes of a file, link, or every file under a directory (links not followed)."""
    if os.path.islink(path) or not os.path.isdir(path):
        return os.lstat(path).st_size
    total = 0
    for dirpath, _dirs, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def remove_path(path):
    """Remove a file, link or whole tree, read-only release files included (never follows a link)."""
    if os.path.isdir(path) and not os.path.islink(path):
        for dirpath, _dirs, filenames in os.walk(path):
            for fn in filenames:
                os.chmod(os.path.join(dirpath, fn), 0o644)
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


@op
def leftovers(adapter_dir, models, keep=()):
    """Temp paths an interrupted command left in adapter_dir: staging dirs (except `keep`, the ones an
    open transaction will reuse), swap links, temp files of atomic writes and lock attempts.
    Returns [{'path', 'bytes', 'what'}]."""
    found = []
    if not os.path.isdir(adapter_dir):
        return found
    temp = re.compile(r"^\..+\.\d+\.tmp$|^\.adapterctl\.lock\..+\.new$")
    for name in os.listdir(adapter_dir):
        if temp.match(name):
            found.append((os.path.join(adapter_dir, name), "temp file of an interrupted write"))
    for model in models:
        mdir = _model_dir(adapter_dir, model)
        sdir = os.path.join(mdir, "staging")
        for name in sorted(os.listdir(sdir)) if os.path.isdir(sdir) else []:
            if name[: -len(".tmp")] not in keep:
                found.append((os.path.join(sdir, name), "staging of an unfinished transfer"))
        for name in sorted(os.listdir(mdir)) if os.path.isdir(mdir) else []:
            if name.endswith(".swap") or temp.match(name):
                found.append((os.path.join(mdir, name), "temp link of an interrupted swap"))
    return [{"path": p, "bytes": tree_size(p), "what": w} for p, w in found]


@op
def remove_leftovers(adapter_dir, models, keep=()):
    """Remove what `leftovers` lists (caller holds the endpoint lock). Returns what was removed."""
    removed = leftovers(adapter_dir, models, keep)
    for item in removed:
        remove_path(item["path"])
    return removed


@op
def prune(adapter_dir, model, names):
    """Remove the named releases, except what active/previous point to (checked now)."""
    rdir = os.path.join(_model_dir(adapter_dir, model), "releases")
    protected = {_link_target(adapter_dir, model, "active"), _link_target(adapter_dir, model, "previous")}
    removed = []
    for name in names:
        target = os.path.join(rdir, _check("version id", name, _VERSION))
        if name in protected or not os.path.isdir(target):
            continue
        remove_path(target)
        removed.append(name)
    sdir = os.path.join(_model_dir(adapter_dir, model), "staging")
    for name in sorted(os.listdir(sdir)) if os.path.isdir(sdir) else []:
        if name.endswith(".tmp"):  # staging of versions no transaction is moving any more
            shutil.rmtree(os.path.join(sdir, name), ignore_errors=True)
            removed.append("staging/" + name)
    return removed


@op
def free_bytes(path):
    return _free_bytes(path)[0]


def handle(request):
    """Decode one JSON request, run its op, return the JSON response (never raises)."""
    try:
        req = json.loads(request)
        fn = OPS.get(req.get("op"))
        if fn is None:
            raise OpError("invalid", "unknown endpoint operation %r" % req.get("op"))
        result = fn(**req.get("args", {}))
        return json.dumps({"ok": True, "result": result})
    except OpError as exc:
        err = {"kind": exc.kind, "message": exc.message, "hint": exc.hint, "data": exc.data}
    except OSError as exc:
        where = " %s" % exc.filename if exc.filename else ""
        kind = (
            "no_space" if exc.errno == errno.ENOSPC else "permission" if exc.errno == errno.EACCES else "os"
        )
        err = {"kind": kind, "message": "%s%s" % (exc.strerror or exc, where), "hint": None}
    except Exception as exc:  # report, never crash the channel
        err = {"kind": "bug", "message": "%s: %s" % (type(exc).__name__, exc), "hint": "rerun with --debug"}
    return json.dumps({"ok": False, "error": err})


if __name__ == "__main__":
    sys.stdout.write(handle(sys.stdin.read()))

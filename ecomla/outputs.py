"""The one rule for output folders, used by every stage that writes one.

- ecomla never deletes or replaces what it did not write. A folder is ecomla's when it holds the manifest
  `ecomla_output.json`, which names the stage that wrote it; a temporary sibling `OUT.tmp-PID` is ecomla's when
  it holds one too, and so is a temporary `NAME.tmp-PID` inside an ecomla folder or ecomla's cache.
- OUT may not be an input, lie inside an input, or hold an input.
- An existing OUT is taken only when it is empty or an earlier output of the same stage: `--overwrite` replaces a
  finished one (convert, export), `--resume` continues a run (distill, dpo), and stages whose reruns continue
  (eval, bench, demo) reuse theirs.
- Every atomic write goes through a temporary sibling named by `temp_path` (NAME.tmp-PID: unique to the process,
  so two processes writing one file never share it); those left by a killed process (its PID is gone) are removed
  on the next write to the same path.
- A run folder is locked while a process works in it: `OUT/.ecomla.lock` holds the PID under an exclusive
  `flock`, which the kernel releases when the process dies, so a stale lock never blocks.
- A resumed run keeps its settings: the manifest stores them, and a resume that changes one that shapes the data
  stream, the schedule or the model is refused, naming it; a refusal touches no file, the lock file included.
- Whether a stage finished is read from its manifest (`finished`): `atomic_dir` and `run_dir` stamp it on success,
  a run that releases its lock itself calls `mark_finished`. A trained model enters its run folder by `publish`.

    with atomic_dir(out, "convert", inputs=[src], overwrite=args.overwrite) as tmp: ...   # written at once
    with run_dir(out, "distill", inputs=[student], resume=args.resume, settings=s, may_change=M): ...  # over time

It imports only `common` (errors, the cache folder) and `args` (flag names).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
from pathlib import Path

from .args import flag_name
from .common import UserError, cache_dir

MANIFEST = "ecomla_output.json"
LOCK = ".ecomla.lock"
# cache folders ecomla wrote before manifests existed, recognised by the record each holds
LEGACY = {"assets": "ecomla_asset.json"}
TEMP = re.compile(r"(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)$")  # what `temp_path` names


def _manifest(folder: Path) -> dict | None:
    """The folder's manifest, or None when it has none (or an unreadable one: then it is not provably ours)."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        legacy = [stage for stage, record in LEGACY.items() if (folder / record).is_file()]
        return {"stage": legacy[0]} if legacy else None
    return data if isinstance(data, dict) and isinstance(data.get("stage"), str) else None


def _write_manifest(folder: Path, stage: str, inputs, settings: dict | None = None) -> None:
    data = {"stage": stage, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "pid": os.getpid(),
            "inputs": [str(i) for i in inputs if i is not None], "settings": settings or {}}
    _replace_manifest(folder, data)


def _replace_manifest(folder: Path, data: dict) -> None:
    tmp = temp_path(folder / MANIFEST)
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, folder / MANIFEST)


def mark_finished(folder) -> None:
    """Stamp FOLDER's manifest: its stage finished (the last write of a run, after its results)."""
    data = _manifest(Path(folder))
    _replace_manifest(Path(folder), {**data, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})


def finished(folder, stage: str) -> bool:
    """Whether FOLDER holds a finished `ecomla STAGE` output (what a pipeline reuses instead of running STAGE)."""
    data = _manifest(Path(folder))
    return data is not None and data["stage"] == stage and "finished" in data


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _check_paths(out: Path, inputs) -> None:
    """OUT is a folder path (no regular file on the way) and apart from every local input."""
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            where = "is a file" if p == out else f"lies below the file {p}"
            raise UserError(f"--out {out} {where}; choose a folder path for --out")
    o = out.resolve()
    for spec in inputs:
        if spec is None or not Path(spec).exists():
            continue  # a hub id, or an input that is not a path
        i = Path(spec).resolve()
        if o == i:
            raise UserError(f"--out {out} is the input {spec}; choose another --out (ecomla never writes over "
                            "its inputs)")
        if o.is_relative_to(i):
            raise UserError(f"--out {out} lies inside the input {spec}; choose a --out outside it")
        if i.is_relative_to(o):
            raise UserError(f"the input {spec} lies inside --out {out}; choose a --out that does not hold it")


def _check_existing(out: Path, stage: str, may_take: bool, flag: str) -> bool:
    """Whether OUT holds an earlier output of `stage` (True) or is absent/empty (False); refuses anything else."""
    if not out.exists() or not any(out.iterdir()):
        return False
    found = _manifest(out)
    if found is None:
        raise UserError(f"--out {out} holds files ecomla did not write; ecomla never replaces those: choose "
                        "another --out")
    if found["stage"] != stage:
        raise UserError(f"--out {out} holds an `ecomla {found['stage']}` output, not an `ecomla {stage}` one; "
                        "choose another --out")
    if not may_take:
        raise UserError(f"--out {out} holds an earlier `ecomla {stage}` output; pass {flag} or choose another --out")
    return True


def temp_path(path, kind: str = "tmp", *, clean: bool = True) -> Path:
    """A free temporary sibling for PATH, unique to this process: NAME.tmp-PID (`kind` "old": the output that a
    finished write moves aside). Write it, then rename it onto PATH. PATH's temporaries that dead processes left
    are removed first (`clean=False`: the caller has cleaned the folder, `clean_stale(folder, every=True)`), and
    so is one this process left (a write that failed before it could clean up)."""
    path = Path(path)
    if clean:
        clean_stale(path)
    tmp = path.with_name(f"{path.name}.{kind}-{os.getpid()}")
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp)
    else:
        tmp.unlink(missing_ok=True)
    return tmp


def _ecomla_wrote(p: Path) -> bool:
    """A folder holding a manifest, or anything inside an ecomla output folder or ecomla's cache."""
    if p.is_dir() and _manifest(p) is not None:
        return True
    cache, here = cache_dir().resolve(), p.parent.resolve()
    return any(a == cache or _manifest(a) is not None for a in (here, *here.parents))


def clean_stale(path, *, every: bool = False) -> list[Path]:
    """Remove PATH's temporaries (NAME.tmp-PID, NAME.old-PID; with `every`, those of any name inside the folder
    PATH) whose process is gone and that ecomla wrote (`_ecomla_wrote`); nothing else is touched."""
    path = Path(path)
    folder = path if every else path.parent
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = TEMP.match(p.name)
        if m and (every or m["name"] == path.name) and not _alive(int(m["pid"])) and _ecomla_wrote(p):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p)
    return removed


def started(out) -> bool:
    """Whether OUT holds an ecomla output (e.g. a run that a rerun should continue)."""
    return _manifest(Path(out)) is not None


def check_out(out, stage: str, inputs=(), *, overwrite: bool = False) -> None:
    """Everything `atomic_dir` refuses, checked alone: call it before heavy compute, so a bad --out costs nothing."""
    out = Path(out)
    _check_paths(out, inputs)
    _check_existing(out, stage, overwrite, "--overwrite to replace it")


@contextlib.contextmanager
def atomic_dir(out, stage: str, inputs=(), *, overwrite: bool = False):
    """Yield a temporary folder next to OUT (holding the manifest); on success it replaces OUT, on error it is
    removed. OUT must be free, or an earlier output of the same stage with `overwrite`."""
    out = Path(out)
    check_out(out, stage, inputs, overwrite=overwrite)
    had = out.exists() and any(out.iterdir())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out)
    tmp.mkdir()
    try:
        _write_manifest(tmp, stage, inputs)
        yield tmp
        mark_finished(tmp)
        if out.exists() and any(out.iterdir()):  # someone wrote OUT meanwhile: take it only if it is still ours
            if not had:
                raise UserError(f"--out {out} appeared while this command ran; choose another --out")
            _check_existing(out, stage, True, "--overwrite")
            old = temp_path(out, "old")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            if out.exists():
                out.rmdir()  # empty
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class RunLock:
    """An exclusive lock on a run folder: OUT/.ecomla.lock holds the PID under `flock`. A second process is
    refused with the holder's PID; a lock left by a dead process is free (the kernel dropped its flock).
    `created`: the claim made the folder, so releasing removes it again if nothing but the manifest was written
    (a run refused after its claim leaves nothing behind). `record=False`: hold the lock without writing the PID
    yet (`record`), so a run refused while holding it leaves the lock file as it was."""

    def __init__(self, folder: Path, created: bool = False, *, record: bool = True):
        self.folder, self.created = Path(folder), created
        self.path = Path(folder) / LOCK
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 64).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise UserError(f"{folder} is in use by another ecomla process (PID {holder}); wait for it to finish "
                            "or stop it, or choose another --out") from None
        if record:
            self.record()

    def record(self) -> None:
        """Write this process's PID into the lock file: what a second process that is refused names."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is None:
            return
        if self.created and {p.name for p in self.folder.iterdir()} <= {MANIFEST, LOCK}:
            for name in (MANIFEST, LOCK):
                (self.folder / name).unlink(missing_ok=True)
            self.folder.rmdir()
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def check_settings(stored: dict, settings: dict, may_change: tuple[str, ...], out: Path) -> None:
    """Refuse a resume whose settings differ from the stored run's, except those in `may_change`. A key with a space
    describes an input (e.g. "student shapes") rather than naming a flag."""
    changed = [k for k in sorted(set(stored) | set(settings))
               if k not in may_change and stored.get(k) != settings.get(k)]
    if changed:
        k = changed[0]
        label = k if " " in k else flag_name(k)  # a key with a space describes an input, not a flag
        raise UserError(f"{out} holds a run made with {label} {stored.get(k)!r}, not {settings.get(k)!r}; continue "
                        f"it with the same value or choose another --out ({len(changed)} setting(s) differ: "
                        f"{', '.join(changed)})")


def claim_run(out, stage: str, inputs=(), *, resume: bool = False, settings: dict | None = None,
              may_change: tuple[str, ...] = (), continues: bool = False) -> RunLock:
    """Take OUT for a run that fills it over time; returns the held lock (release it when the run ends).

    `resume`: continue an earlier run of this stage. `continues`: the stage reruns into its own folder without a
    flag (eval, bench, demo). Either way, a run continued must have the stored `settings`, except `may_change`."""
    out = Path(out)
    _check_paths(out, inputs)
    earlier = _check_existing(out, stage, resume or continues, "--resume to continue it")
    if resume and not earlier:
        raise UserError(f"--resume: {out} holds no earlier `ecomla {stage}` run; drop --resume to start one")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out, created, record=False)  # a refusal below leaves even the lock file unwritten
    try:
        if earlier and settings is not None:  # a run continued (--resume, or a rerun of a continuing stage)
            check_settings(_manifest(out).get("settings", {}), settings, may_change, out)
        if not earlier:
            _write_manifest(out, stage, inputs, settings)
        lock.record()
    except BaseException:
        lock.release()
        raise
    return lock


@contextlib.contextmanager
def run_dir(out, stage: str, inputs=(), **kw):
    """`claim_run` as a context: the lock is held inside and released after; a block that ends without an error
    stamps the run finished."""
    lock = claim_run(out, stage, inputs, **kw)
    try:
        yield Path(out)
        mark_finished(out)
    finally:
        lock.release()


def publish(stage: Path, out, model=None) -> None:
    """Move a final model, written into `stage` (a `temp_path` inside OUT), into the run folder OUT: MODEL's
    ecomla_convert.json is copied along, so the conversion's record survives training; the weights land before
    config.json, so a reader never sees a config without its weights."""
    record = Path(model) / "ecomla_convert.json" if model is not None else None
    if record is not None and record.is_file():
        shutil.copy(record, stage / "ecomla_convert.json")
    for name in sorted(os.listdir(stage), key=lambda n: n == "config.json"):
        os.replace(stage / name, Path(out) / name)
    stage.rmdir()

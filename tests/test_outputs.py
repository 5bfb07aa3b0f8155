"""The one rule for output folders (ecomla/outputs.py): nothing the tool did not write is deleted or replaced,
OUT stays apart from the inputs, --overwrite takes only an earlier output of the same stage, a run folder has one
process at a time, a resume keeps the run's settings (and a refused one leaves even the lock file unwritten),
temporary names carry the PID and stale ones are cleaned up, a final model is published in one way, and whether a
stage finished is read from its manifest."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ecomla.cli import main
from ecomla.convert.convert import ConvertArgs, convert
from ecomla.distill import DistillArgs, distill
from ecomla.common import cache_dir
from ecomla.outputs import (MANIFEST, RunLock, atomic_dir, claim_run, clean_stale, finished, mark_finished, publish,
                            run_dir, temp_path)
from tests.helpers import assert_refused, make_source, snapshot
from tests.test_data_eval import chat_rows

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny source, its MLA conversion (an earlier convert output), a DeepSeek-V3-exportable conversion, chat
    data, and a finished short distillation run."""
    r = tmp_path_factory.mktemp("outputs")
    make_source("llama", r / "src", tie_word_embeddings=True)
    (r / "chat.jsonl").write_text("\n".join(json.dumps(x) for x in chat_rows(200)))
    (r / "text.txt").write_text("the cat sat on the mat. " * 50)
    quiet = lambda *a: None  # noqa: E731
    convert(ConvertArgs(src=str(r / "src"), out=str(r / "mla"), kv_rank=8, rope_dim=8), log=quiet)
    convert(ConvertArgs(src=str(r / "src"), out=str(r / "target"), kv_rank=8, rope_dim=8, target="deepseek-v3",
                        calib_data=str(r / "chat.jsonl"), calib_seqs=8, calib_len=16), log=quiet)
    distill(run_args(r, r / "run"))
    return r


def run_args(r, out, **kw) -> DistillArgs:
    base = dict(student=str(r / "mla"), data=str(r / "chat.jsonl"), out=str(out), stage="kd", seq_len=16,
                batch_size=4, max_tokens=64 * 4, precision="fp32", eval_tokens=0, save_every=2, progress=False,
                compile_loss=False)
    return DistillArgs(**{**base, **kw})


def distill_argv(r, out, *extra) -> list[str]:
    return ["distill", str(r / "mla"), "--data", str(r / "chat.jsonl"), "--out", str(out), "--stage", "kd",
            "--seq-len", "16", "--batch-size", "4", "--max-tokens", "256", "--precision", "fp32", "--eval-tokens",
            "0", "--save-every", "2", "--no-progress", "--no-compile-loss", *extra]


def convert_argv(r, out, *extra) -> list[str]:
    return ["convert", str(r / "src"), str(out), "--kv-rank", "8", "--rope-dim", "8", *extra]


def export_argv(r, out, *extra) -> list[str]:
    return ["export", str(r / "target"), str(out), "--format", "deepseek-v3", *extra]


def foreign(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "notes.txt").write_text("mine, not ecomla's")
    return path


def chat_inside(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "c.jsonl").write_text("\n".join(json.dumps(x) for x in chat_rows(20)))
    return str(folder / "c.jsonl")


def eval_argv(r, out) -> list[str]:
    return ["eval", str(r / "mla"), "--tasks", "none", "--data", str(r / "chat.jsonl"), "--text", str(r / "text.txt"),
            "--out", str(out)]


def demo_argv(r, out) -> list[str]:
    return ["demo", "--model", str(r / "src"), "--data", str(r / "chat.jsonl"), "--text", str(r / "text.txt"),
            "--out", str(out)]


def demo_run(r, t) -> Path:
    """A demo folder holding an earlier (interrupted) run with the default settings."""
    from dataclasses import asdict

    from ecomla.demo import DemoArgs

    folder = t / "demo"
    argv = demo_argv(r, folder)
    given = DemoArgs(model=argv[2], data=argv[4], text=argv[6], out=str(folder))
    lock = claim_run(folder, "demo", continues=True, settings={k: v for k, v in asdict(given).items() if k != "out"})
    (folder / "state.json").write_text("{}")
    lock.release()
    return folder


def dpo_run_of_another_conversion(r, t) -> list[str]:
    """A dpo folder whose run was made on a model with other shapes (the same MODEL folder, re-converted)."""
    from ecomla.args import run_settings
    from ecomla.dpo.run import DPOArgs

    folder = t / "dpo"
    argv = ["dpo", str(r / "mla"), "--make-pairs", "--out", str(folder), "--eval-tokens", "0"]
    given = DPOArgs(model=argv[1], make_pairs=True, out=str(folder), eval_tokens=0)
    lock = claim_run(folder, "dpo", settings={**run_settings(given), "model shapes": "kv 4 + rope 8, q None x3"})
    (folder / "metrics.jsonl").write_text("")
    lock.release()
    return argv + ["--resume"]


# (argv builder over (world, tmp_path), what the one message says); every case runs with the whole world and
# tmp_path checked byte-identical afterwards.
CASES = [
    pytest.param(lambda r, t: convert_argv(r, r / "src", "--overwrite"), "is the input", id="convert-out-is-src"),
    pytest.param(lambda r, t: convert_argv(r, r, "--overwrite"), "does not hold it",
                 id="convert-out-parent-of-src"),
    pytest.param(lambda r, t: convert_argv(r, r / "src" / "sub"), "inside the input", id="convert-out-inside-src"),
    pytest.param(lambda r, t: convert_argv(r, foreign(t / "o"), "--overwrite"), "did not write",
                 id="convert-overwrite-foreign-files"),
    pytest.param(lambda r, t: convert_argv(r, foreign(t / "o")), "did not write", id="convert-out-foreign-files"),
    pytest.param(lambda r, t: convert_argv(r, r / "run", "--overwrite"), "ecomla distill",
                 id="convert-over-distill-run"),
    pytest.param(lambda r, t: convert_argv(r, r / "mla"), "--overwrite", id="convert-earlier-output-no-flag"),
    pytest.param(lambda r, t: convert_argv(r, r / "chat.jsonl", "--overwrite"), "is a file", id="convert-out-is-file"),
    pytest.param(lambda r, t: convert_argv(r, r / "chat.jsonl" / "x"), "below the file", id="convert-out-below-file"),
    pytest.param(lambda r, t: convert_argv(r, t / "o", "--calib-data", chat_inside(t / "o")), "inside --out",
                 id="convert-calib-data-inside-out"),
    pytest.param(lambda r, t: distill_argv(r, t / "o") + ["--data", chat_inside(t / "o")], "inside --out",
                 id="distill-data-inside-out"),
    pytest.param(lambda r, t: export_argv(r, r / "target", "--overwrite"), "is the input", id="export-out-is-model"),
    pytest.param(lambda r, t: export_argv(r, r / "target" / "ds"), "inside the input", id="export-out-inside-model"),
    pytest.param(lambda r, t: export_argv(r, r / "mla", "--overwrite"), "ecomla convert", id="export-over-convert-out"),
    pytest.param(lambda r, t: export_argv(r, foreign(t / "o"), "--overwrite"), "did not write",
                 id="export-overwrite-foreign-files"),
    pytest.param(lambda r, t: export_argv(r, r / "chat.jsonl"), "is a file", id="export-out-is-file"),
    pytest.param(lambda r, t: distill_argv(r, r / "mla"), "is the input", id="distill-out-is-student"),
    pytest.param(lambda r, t: distill_argv(r, r / "mla" / "run"), "inside the input", id="distill-out-inside-student"),
    pytest.param(lambda r, t: distill_argv(r, r), "does not hold it", id="distill-out-holds-inputs"),
    pytest.param(lambda r, t: distill_argv(r, foreign(t / "o")), "did not write", id="distill-out-foreign-files"),
    pytest.param(lambda r, t: distill_argv(r, foreign(t / "o"), "--resume"), "did not write",
                 id="distill-resume-foreign-files"),
    pytest.param(lambda r, t: distill_argv(r, r / "run"), "--resume", id="distill-earlier-run-no-resume"),
    pytest.param(lambda r, t: distill_argv(r, t / "new", "--resume"), "no earlier", id="distill-resume-nothing"),
    pytest.param(lambda r, t: distill_argv(r, r / "target", "--resume"), "ecomla convert",
                 id="distill-resume-a-convert-output"),
    pytest.param(lambda r, t: distill_argv(r, r / "run", "--resume", "--seq-len", "32"), "--seq-len 16",
                 id="resume-changed-seq-len"),
    pytest.param(lambda r, t: distill_argv(r, r / "run", "--resume", "--max-tokens", "512"), "--max-tokens 256",
                 id="resume-changed-max-tokens"),
    pytest.param(lambda r, t: distill_argv(r, r / "run", "--resume", "--lr", "0.5"), "--lr",
                 id="resume-changed-lr"),
    pytest.param(lambda r, t: distill_argv(r, r / "run", "--resume", "--seed", "3"), "--seed 0",
                 id="resume-changed-seed"),
    pytest.param(lambda r, t: distill_argv(r, r / "run", "--resume", "--batch-size", "2"), "--batch-size 4",
                 id="resume-changed-batch-size"),
    pytest.param(lambda r, t: distill_argv(r, r / "run", "--resume", "--stage", "both"), "--ild-tokens|--stage",
                 id="resume-changed-stage"),
    pytest.param(lambda r, t: distill_argv(r, r / "run", "--resume", "--teacher-topk", "8"), "--teacher-topk",
                 id="resume-changed-teacher"),
    pytest.param(lambda r, t: ["dpo", str(r / "mla"), "--make-pairs", "--out", str(r / "mla"), "--eval-tokens", "0"],
                 "is the input", id="dpo-out-is-model"),
    pytest.param(lambda r, t: ["dpo", str(r / "mla"), "--make-pairs", "--out", str(r / "run"), "--resume"],
                 "ecomla distill", id="dpo-resume-a-distill-run"),
    pytest.param(lambda r, t: ["dpo", str(r / "mla"), "--make-pairs", "--out", str(foreign(t / "o"))],
                 "did not write", id="dpo-out-foreign-files"),
    pytest.param(dpo_run_of_another_conversion, "model shapes 'kv 4 \\+ rope 8", id="dpo-resume-model-reconverted"),
    pytest.param(lambda r, t: eval_argv(r, r / "mla"), "is the input", id="eval-out-is-model"),
    pytest.param(lambda r, t: eval_argv(r, r / "mla" / "eval"), "inside the input", id="eval-out-inside-model"),
    pytest.param(lambda r, t: eval_argv(r, foreign(t / "o")), "did not write", id="eval-out-foreign-files"),
    pytest.param(lambda r, t: eval_argv(r, r / "target"), "ecomla convert", id="eval-out-a-convert-output"),
    pytest.param(lambda r, t: eval_argv(r, r / "chat.jsonl"), "is a file", id="eval-out-is-file"),
    pytest.param(lambda r, t: ["bench", str(r / "mla"), "--out", str(r / "mla")], "is the input",
                 id="bench-out-is-model"),
    pytest.param(lambda r, t: ["bench", str(r / "mla"), "--out", str(foreign(t / "o"))], "did not write",
                 id="bench-out-foreign-files"),
    pytest.param(lambda r, t: ["bench", str(r / "mla"), "--out", str(r / "run")], "ecomla distill",
                 id="bench-out-a-distill-run"),
    pytest.param(lambda r, t: demo_argv(r, r / "src"), "is the input", id="demo-out-is-model"),
    pytest.param(lambda r, t: demo_argv(r, foreign(t / "o")), "did not write", id="demo-out-foreign-files"),
    pytest.param(lambda r, t: demo_argv(r, r / "run"), "ecomla distill", id="demo-out-a-distill-run"),
    pytest.param(lambda r, t: demo_argv(r, r), "does not hold it", id="demo-out-holds-inputs"),
    pytest.param(lambda r, t: demo_argv(r, demo_run(r, t)) + ["--ratio", "8x"], "--ratio '4x', not '8x'",
                 id="demo-rerun-changed-ratio"),
    pytest.param(lambda r, t: demo_argv(r, demo_run(r, t)) + ["--budget-minutes", "3"], "--budget-minutes 12",
                 id="demo-rerun-changed-budget"),
]


@pytest.mark.parametrize("build,says", CASES)
def test_bad_output_folders_are_refused_and_nothing_changes(world, tmp_path, capsys, monkeypatch, build, says):
    argv = build(world, tmp_path)
    assert_refused(argv, capsys, monkeypatch, says, roots=(world, tmp_path))


def test_overwrite_replaces_only_an_earlier_output_of_the_same_stage(world, tmp_path):
    out = tmp_path / "mla"
    assert main(convert_argv(world, out)) == 0
    first = json.loads((out / MANIFEST).read_text())
    assert first["stage"] == "convert"
    assert main(convert_argv(world, out, "--overwrite")) == 0
    assert json.loads((out / MANIFEST).read_text())["created"] >= first["created"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mla"]  # no .tmp-/.old- sibling left behind


def test_a_killed_convert_leaves_a_temporary_folder_the_next_write_removes(world, tmp_path):
    out = tmp_path / "o"
    code = ("import os, sys; from ecomla.outputs import atomic_dir\n"
            "with atomic_dir(sys.argv[1], 'convert') as tmp:\n"
            "    (tmp / 'model.safetensors').write_bytes(b'half')\n"
            "    os.kill(os.getpid(), 9)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL
    left = [p for p in tmp_path.iterdir() if p.name.startswith("o.tmp-")]
    assert len(left) == 1 and not out.exists()
    mine = foreign(tmp_path / "o.tmp-1")  # PID 1 is alive and the folder holds no manifest: never touched
    assert main(convert_argv(world, out)) == 0
    assert not left[0].exists() and (mine / "notes.txt").is_file() and (out / "config.json").is_file()


def dead_pid() -> int:
    """The PID of a process that has exited."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def test_stale_cleanup_touches_only_our_folders_of_dead_processes(tmp_path):
    pid = dead_pid()
    ours = tmp_path / f"x.tmp-{pid}"
    ours.mkdir()
    (ours / MANIFEST).write_text(json.dumps({"stage": "convert"}))
    theirs = foreign(tmp_path / f"x.old-{pid}")
    live = tmp_path / f"x.tmp-{os.getpid()}"
    live.mkdir()
    (live / MANIFEST).write_text(json.dumps({"stage": "convert"}))
    assert clean_stale(tmp_path / "x") == [ours]
    assert theirs.exists() and live.exists()


def test_an_output_that_appears_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(Exception, match="appeared while"):
        with atomic_dir(out, "convert") as tmp:
            (tmp / "a").write_text("new")
            foreign(out)
    assert (out / "notes.txt").read_text() == "mine, not ecomla's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_a_second_process_on_a_run_folder_is_refused_until_the_first_is_gone(world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    lock = claim_run(out, "distill", settings={})  # an earlier run's folder
    (out / "metrics.jsonl").write_text("")
    lock.release()
    code = "import sys, time; from ecomla.outputs import RunLock; RunLock(sys.argv[1]); print('held', flush=True); " \
           "time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        msg = assert_refused(distill_argv(world, out, "--resume"), capsys, monkeypatch, "in use by another",
                             roots=(tmp_path,))
        assert str(holder.pid) in msg
    finally:
        holder.kill()
        holder.wait()
    RunLock(out).release()  # the dead holder's lock file is left, but its flock went with it


def test_resume_may_change_the_named_settings_and_logs_one_final_row(world, tmp_path):
    out = tmp_path / "run"
    distill(run_args(world, out, max_minutes=60.0))
    distill(run_args(world, out, resume=True, max_minutes=30.0, keep_last=1, eval_tokens=0))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("final" in r for r in rows) == 1
    assert [r["step"] for r in rows if "step" in r] == list(range(4))


def test_resume_loads_no_pickled_state(world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    distill(run_args(world, out))
    ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert not list(ckpt.glob("custom_checkpoint_*")) and "kd" in json.loads((ckpt / "trainer.json").read_text())
    (ckpt / "custom_checkpoint_0.pkl").write_bytes(b"\x80\x04 not loaded")
    assert_refused(distill_argv(world, out, "--resume"), capsys, monkeypatch, "pickled", roots=(tmp_path,))


def test_resume_help_names_the_settings_that_may_change(capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "except --max-minutes, --save-every" in text


def test_a_run_refused_after_its_claim_leaves_no_folder(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with run_dir(out, "eval", continues=True):
            raise RuntimeError("the first model failed to load")
    assert not out.exists()
    kept = tmp_path / "kept"
    with run_dir(kept, "eval", continues=True):
        (kept / "results.json").write_text("{}")
    assert sorted(p.name for p in kept.iterdir()) == [".ecomla.lock", MANIFEST, "results.json"]


def test_snapshot_sees_a_one_byte_change(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    before = snapshot(tmp_path)
    (tmp_path / "f").write_bytes(b"abd")
    assert snapshot(tmp_path) != before


def test_snapshot_sees_a_rewrite_with_the_same_bytes(tmp_path):
    (tmp_path / ".ecomla.lock").write_bytes(b"123\n")
    os.utime(tmp_path / ".ecomla.lock", ns=(10**18, 10**18))
    before = snapshot(tmp_path)
    (tmp_path / ".ecomla.lock").write_bytes(b"123\n")
    assert snapshot(tmp_path) != before


def test_a_refused_resume_leaves_the_lock_file_as_another_process_left_it(world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(world / "run", out)
    lock = out / ".ecomla.lock"
    lock.write_text("12345\n")  # the PID of the process that ran it, a day ago
    os.utime(lock, ns=(10**18, 10**18))
    for change in (["--seq-len", "32"], ["--lr", "0.5"]):
        assert_refused(distill_argv(world, out, "--resume", *change), capsys, monkeypatch, change[0],
                       roots=(tmp_path,))
    assert lock.read_text() == "12345\n" and lock.stat().st_mtime_ns == 10**18


def test_temporary_names_carry_the_pid_and_no_writer_spells_its_own(tmp_path):
    assert temp_path(tmp_path / "state.json") == tmp_path / f"state.json.tmp-{os.getpid()}"
    assert temp_path(tmp_path / "o", "old") == tmp_path / f"o.old-{os.getpid()}"
    mine = temp_path(tmp_path / "x.pt")
    mine.write_text("left by a failed write of this process")
    assert temp_path(tmp_path / "x.pt") == mine and not mine.exists()  # handed out free
    # every atomic write in the package names its temporary through temp_path: no other `.tmp` or PID spelled out
    own = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in sorted((ROOT / "ecomla").rglob("*.py"))
           if p.name != "outputs.py" for i, line in enumerate(p.read_text().splitlines(), 1)
           if re.search(r"\.tmp\b|getpid\(", line)]
    assert not own


def test_stale_temporary_files_are_removed_only_where_ecomla_writes(tmp_path):
    pid = dead_pid()
    run = tmp_path / "run"
    with run_dir(run, "eval", continues=True):
        (run / "results.json").write_text("{}")
    left = {name: run / f"{name}.tmp-{pid}" for name in ("state.json", "chat.json")}
    live = run / "state.json.tmp-1"  # PID 1 is alive
    users = foreign(tmp_path / "mine") / f"notes.txt.tmp-{pid}"  # no manifest around it: not provably ours
    cached = cache_dir() / "calibration" / f"x.pt.tmp-{pid}"
    cached.parent.mkdir(parents=True, exist_ok=True)
    for p in (*left.values(), live, users, cached):
        p.write_text("half")
    temp_path(run / "state.json")
    assert not left["state.json"].exists() and left["chat.json"].exists() and live.exists()  # that name's only
    temp_path(tmp_path / "mine" / "notes.txt")
    temp_path(cached.parent / "x.pt")
    assert users.exists() and not cached.exists()
    assert clean_stale(run, every=True) == [left["chat.json"]] and live.exists()


def test_publish_moves_the_model_in_with_its_record_and_config_last(tmp_path, monkeypatch):
    model = tmp_path / "mla"
    model.mkdir()
    (model / "ecomla_convert.json").write_text('{"init": "fitted"}')
    out = tmp_path / "run"
    out.mkdir()
    stage = temp_path(out / ".final")
    stage.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (stage / name).write_text(name)
    moved, replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (moved.append(Path(dst).name), replace(src, dst)))
    publish(stage, out, model)
    assert moved[-1] == "config.json" and sorted(moved) == ["config.json", "ecomla_convert.json", "model.safetensors",
                                                            "tokenizer.json"]
    assert not stage.exists() and (out / "ecomla_convert.json").read_text() == '{"init": "fitted"}'


def test_whether_a_stage_finished_is_read_from_its_manifest(tmp_path):
    with atomic_dir(tmp_path / "c", "convert") as tmp:
        assert not finished(tmp, "convert")
    assert finished(tmp_path / "c", "convert") and not finished(tmp_path / "c", "export")
    e = tmp_path / "e"
    with pytest.raises(RuntimeError):
        with run_dir(e, "eval", continues=True):
            (e / "part.json").write_text("{}")
            raise RuntimeError("killed half-way")
    assert not finished(e, "eval")
    with run_dir(e, "eval", continues=True):
        pass
    assert finished(e, "eval")
    d = tmp_path / "d"
    lock = claim_run(d, "distill", settings={})
    (d / "ecomla_train.json").write_text("{}")  # a file name alone says nothing
    assert not finished(d, "distill")
    mark_finished(d)
    lock.release()
    assert finished(d, "distill") and json.loads((d / MANIFEST).read_text())["stage"] == "distill"


def test_resume_of_a_student_reconverted_with_another_rank_is_refused(world, tmp_path, capsys, monkeypatch):
    student = tmp_path / "student"
    assert main(convert_argv(world, student)) == 0
    out = tmp_path / "run"
    distill(run_args(world, out, student=str(student)))
    assert main(convert_argv(world, student, "--kv-rank", "4", "--overwrite")) == 0
    argv = distill_argv(world, out, "--resume")
    argv[1] = str(student)
    assert_refused(argv, capsys, monkeypatch, "student shapes 'kv 8 \\+ rope 8", roots=(tmp_path,))


def test_every_refusal_case_is_in_the_reliability_doc():
    from tests import test_bad_inputs

    doc = (ROOT / "docs" / "RELIABILITY.md").read_text()
    ids = [p.id for p in CASES + test_bad_inputs.CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 80
    missing = [i for i in ids if f"| `{i}` |" not in doc]
    assert not missing, f"docs/RELIABILITY.md lacks {missing}: rerun tools/refusal_table.py"

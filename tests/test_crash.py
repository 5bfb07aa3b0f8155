"""Crash safety of a distillation run: kill -9 at six moments (mid-step in each stage, mid-checkpoint, while pruning
old checkpoints, mid-final-save, after the final save) and `--resume` always ends bit-identical to the run that was
never interrupted: the same logged losses, gradient norms and learning rates, and the same final weights. With a
time budget (a fake clock, tests/test_distill.py) too: killed before the KD length was fixed (the resumed run
measures again, with the step times stored so far) and after (it uses the stored length)."""

import json
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ecomla.distill import DistillArgs, Trainer
from tests.helpers import untimed
from tests.test_distill import setup  # noqa: F401  (the module fixture: a tiny student and chat data)

ROOT = Path(__file__).resolve().parents[1]

# The child process: the same run, with one function wrapped to SIGKILL the process at MOMENT.
CHILD = r"""
import json, os, signal, sys
from ecomla.distill import DistillArgs, Trainer
import ecomla.distill.trainer as T
import ecomla.outputs as O

moment, args, budget = sys.argv[1], DistillArgs(**json.loads(sys.argv[2])), sys.argv[3]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)


def wrap(owner, name, before=None, after=None):
    original = getattr(owner, name)
    calls = []

    def wrapped(*a, **k):
        calls.append(1)
        if before and before(len(calls), *a, **k):
            die()
        out = original(*a, **k)
        if after and after(len(calls), *a, **k):
            die()
        return out
    setattr(owner, name, wrapped)


if moment == "ild-step":        # step 1 of 2 ILD steps, before any checkpoint
    wrap(Trainer, "ild_step", before=lambda n, self, step: step == 1)
elif moment == "kd-step":       # step 7, one step after the step-6 checkpoint
    wrap(Trainer, "kd_step", before=lambda n, self, step: step == 7)
elif moment == "late-kd-step":  # step 9: a time budget resumes from step 8's checkpoint, which fixed the KD length
    wrap(Trainer, "kd_step", before=lambda n, self, step: step == 9)
elif moment == "mid-checkpoint":  # accelerate wrote step 6's state into step-0000006.tmp-PID, not yet renamed
    wrap(T.Accelerator, "save_state", after=lambda n, self, path: path.endswith(f"step-0000006.tmp-{os.getpid()}"))
elif moment == "mid-prune":     # removing the checkpoint that step 6's one replaces
    wrap(T.shutil, "rmtree", before=lambda n, path, **k: str(path).endswith("step-0000003"))
elif moment == "mid-final-save":  # some files of the final checkpoint moved into OUT, config.json not yet
    wrap(O.os, "replace", before=lambda n, src, dst: ".final.tmp-" in str(src) and str(dst).endswith("config.json"))
elif moment == "after-final-save":  # the final checkpoint is in OUT; the held-out check and summary are not
    wrap(Trainer, "heldout_check", before=lambda n, self: True)
from tests.test_crash import start
start(args, budget)
"""

MOMENTS = ["ild-step", "kd-step", "mid-checkpoint", "mid-prune", "mid-final-save", "after-final-save"]
# 2 ILD + 8 KD steps either way: 10 fake seconds a step, the KD length fixed at step 2 + 6 (80 s spent) to fill 105 s
BUDGETS = {"tokens": {"max_tokens": 64 * 8}, "minutes": {"max_tokens": None, "max_minutes": 105 / 60}}
CASES = [("tokens", m) for m in MOMENTS] + [("minutes", m) for m in ("kd-step", "mid-checkpoint", "late-kd-step")]


def start(args: DistillArgs, budget: str) -> dict:
    """Run (or resume) a distillation; a time budget runs on test_distill's fake clock."""
    from tests.test_distill import fake_clock

    trainer = Trainer(args)
    return (fake_clock(trainer) if budget == "minutes" else trainer).run()


@pytest.fixture(scope="module")
def full(setup):  # noqa: F811  (pytest injects the imported fixture)
    """test_distill's tiny student and chat data, and the uninterrupted run of each budget (2 ILD + 8 KD steps,
    checkpoints every 3), made when first asked for."""
    made = {}

    def run(budget: str) -> Path:
        if budget not in made:
            start(run_args(setup, setup / f"crash-full-{budget}", **BUDGETS[budget]), budget)
            made[budget] = setup / f"crash-full-{budget}"
        return made[budget]
    return run


def run_args(r, out, **kw) -> DistillArgs:
    base = dict(student=str(r / "mla"), data=str(r / "chat.jsonl"), out=str(out), seq_len=16, batch_size=4,
                ild_tokens=64 * 2, max_tokens=64 * 8, precision="fp32", eval_tokens=0, lr=3e-3, ild_lr=3e-3,
                save_every=3, keep_last=1, progress=False, compile_loss=False)
    return DistillArgs(**{**base, **kw})


@pytest.mark.parametrize("budget, moment", CASES)
def test_kill_9_then_resume_is_bit_identical_to_the_uninterrupted_run(setup, full, tmp_path, budget,  # noqa: F811
                                                                     moment):
    out, reference = tmp_path / "run", full(budget)
    child_args = json.dumps(asdict(run_args(setup, out, **BUDGETS[budget])))
    proc = subprocess.run([sys.executable, "-c", CHILD, moment, child_args, budget], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    start(run_args(setup, out, resume=True, **BUDGETS[budget]), budget)
    assert untimed(out) == untimed(reference)
    if budget == "minutes":  # the length fixed from the clock, and the schedule at its floor on the last step
        rows = untimed(reference)
        assert rows[-1]["final"]["kd_steps"] == 8 and rows[-1]["final"]["stopped"] == "max-minutes"
        assert rows[-2]["lr"] == pytest.approx(3e-3 * 0.1)
    a, b = load_file(str(reference / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), "final weights differ"
    assert not list(out.glob("*.tmp-*")) and not list((out / "checkpoints").glob("*.tmp-*"))  # the dead one's too

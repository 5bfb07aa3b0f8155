"""How long a distillation stage runs and its learning-rate schedule: a token budget, or a time budget that is the
schedule.

    budget = Budget(cap=None, minutes=12.0, save_every=20)   # `--max-minutes 12` alone
    budget.multiplier(k, warmup_ratio=0.01, floor=0.1)        # the LR multiplier of KD step k

A token budget (`--max-tokens`) fixes the number of KD steps S up front: linear warmup over max(1, warmup_ratio*S)
steps, then cosine to the floor on step S-1.

A time budget (`--max-minutes` without `--max-tokens`) cannot know S before it has run: the speed depends on the
machine. So the schedule before step CALIBRATION (= 6) depends on nothing unknown: WARMUP (= 2) warmup steps, then
the peak held. After step CALIBRATION finishes, a checkpoint is saved (timed: what each later one will cost) and
S is fixed from the speed measured over the KD steps of [SKIP, CALIBRATION) (each process skips its first SKIP
steps: compiling, first allocations) and the minutes left; the cosine runs from step CALIBRATION down to the floor on
step S-1. S and the measured seconds go into every checkpoint's trainer.json, so a resumed run uses the stored S
and is bit-identical to the run never interrupted; a run resumed before S was fixed measures again, with the step
times stored so far.

MARGIN (3%) of the time left is kept for speed noise. The clock still stops a run that gets slower than measured:
cut at 90% of the cosine, the LR is 1.2x its floor (the tail is flat), so noise costs a few steps near the floor.
A margin sized for the 10-30% noise of a shared machine would leave that share of every quiet machine's minutes
unused. Given both flags, S is the smaller of the two counts: whichever ends first ends the run, with the schedule
at its floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

WARMUP = 2  # warmup steps of a time-budgeted KD stage
SKIP = 2  # KD steps each process runs before timing any (compiling, first allocations)
CALIBRATION = 6  # KD steps before a time budget fixes the stage's length; steps [SKIP, CALIBRATION) are timed
MARGIN = 0.03  # share of the time left that a time budget keeps for speed noise (module docstring)
ENDINGS = {"max-tokens": "--max-tokens ended the run, its schedule at the floor",  # the summary's `stopped`
           "max-minutes": "--max-minutes ended the run, the schedule sized to fill it at the floor",
           "clock": "the --max-minutes clock ran out before the schedule's end",
           "ild-tokens": "--ild-tokens ended the run"}


def warmup_steps(steps: int, ratio: float) -> int:
    return max(1, round(ratio * steps))


def schedule(step: int, steps: int | None, warmup: int, floor: float, hold: int | None = None) -> float:
    """Multiplier for step `step` of a `steps`-step stage: linear warmup over `warmup` steps (the first step already
    moves), the peak held until step `hold` (default: the warmup's end), then cosine down to `floor` on the last
    step. steps None: the length is not known yet, the peak is held."""
    if step < warmup:
        return (step + 1) / warmup
    start = warmup if hold is None else hold
    if steps is None or step < start:
        return 1.0
    p = (step - start) / max(1, steps - 1 - start)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def steps_to_fill(left_s: float, step_s: float, save_s: float, save_every: int, margin: float = MARGIN) -> int:
    """Steps that fit in `left_s` seconds, less `margin` of them: each step costs `step_s`, every `save_every`-th
    one also a checkpoint, and the final checkpoint comes on top."""
    usable = left_s * (1 - margin) - save_s
    return max(0, math.floor(usable / (step_s + save_s / save_every))) if usable > 0 else 0


@dataclass
class Budget:
    """The KD stage's length: `cap` steps (--max-tokens), or the steps that fill `minutes` (--max-minutes), the
    fewer of the two when both are given. `steps` is None until a time budget has measured the speed."""

    cap: int | None  # KD steps --max-tokens allows (None: not given)
    minutes: float | None  # --max-minutes (None: not given)
    save_every: int
    steps: int | None = None
    step_s: list[float] = field(default_factory=list)  # KD step seconds measured before the length was fixed
    save_s: float | None = None  # seconds of the checkpoint saved at step CALIBRATION

    def __post_init__(self):
        if not self.timed:
            self.steps = self.cap

    @property
    def timed(self) -> bool:
        """Sized by the clock: --max-minutes, and no --max-tokens count that ends before the speed is known."""
        return self.minutes is not None and (self.cap is None or self.cap > CALIBRATION)

    def multiplier(self, k: int, warmup_ratio: float, floor: float) -> float:
        if not self.timed:
            return schedule(k, self.steps, warmup_steps(self.steps, warmup_ratio), floor)
        return schedule(k, self.steps, WARMUP, floor, hold=CALIBRATION)

    def measuring(self, k: int, done_here: int) -> bool:
        """Whether KD step k (k < 0: an ILD step), after `done_here` KD steps in this process, is timed for the
        calibration."""
        return self.timed and self.steps is None and 0 <= k < CALIBRATION and done_here >= SKIP

    def due(self, done: int) -> bool:
        """Whether the length is fixed now, `done` KD steps into the stage (later than CALIBRATION only after a
        resume from a checkpoint saved at CALIBRATION by an interrupt, before the length was fixed)."""
        return self.timed and self.steps is None and done >= CALIBRATION

    def fix(self, spent_s: float, save_s: float) -> int:
        """The stage's length from the measured speed and the `spent_s` seconds of the budget already used."""
        step_s = max(sum(self.step_s) / len(self.step_s), 1e-6) if self.step_s else 1e-6  # none: only on a fake clock
        left = self.minutes * 60 - spent_s
        self.save_s = save_s
        self.steps = CALIBRATION + steps_to_fill(left, step_s, save_s, self.save_every)
        if self.cap is not None:
            self.steps = min(self.steps, self.cap)
        return self.steps

    def ended_by(self) -> str:
        """Which flag ended a stage that ran all its steps."""
        return "max-minutes" if self.timed and (self.cap is None or self.steps < self.cap) else "max-tokens"

    def state(self) -> dict:
        """What a checkpoint stores (trainer.json) and the run's summary reports."""
        return {"steps": self.steps, "cap": self.cap, "timed": self.timed, "step_s": self.step_s,
                "save_s": self.save_s, "calibration": CALIBRATION if self.timed else None,
                "margin": MARGIN if self.timed else None}

    def summary(self) -> dict:
        """For the run's summary: the length, what sized it, and the mean measured step."""
        mean = sum(self.step_s) / len(self.step_s) if self.step_s else None
        return {"by": "max-minutes" if self.timed else "max-tokens", "kd_steps": self.steps,
                "max_tokens_steps": self.cap, "measured_step_s": mean, "checkpoint_s": self.save_s,
                "margin": MARGIN if self.timed else None}

    def load(self, state: dict) -> None:
        self.steps, self.step_s, self.save_s = state["steps"], list(state["step_s"]), state["save_s"]

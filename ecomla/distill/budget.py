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
step S-1.

A shared machine's speed moves by 10-30% within a run, and the first steps are rarely typical (12 minutes of KD on
the AMD CPU: the calibrated length used 84-90% of the minutes in four runs of six; notebook 2026-12-07). So the
clock is read again, halfway: at step R = CALIBRATION + (S - CALIBRATION) // 2, S is fixed again from the speed of
the steps since CALIBRATION and the minutes left, and the cosine goes on from the angle it had reached at step R-1
to the floor on the new last step (continuous, no restart). And again halfway through what is left, from the speed
since the last look, for as long as that half is at least LOOK_SPAN steps: one look is fooled by a load that
changes between it and the end (the 8x one-hour recipe, other jobs on the cores for its first third: 87% of the
hour with one look; notebook 2026-12-07). A checkpoint is saved at every look. The lengths, the looks and the
seconds measured go into every checkpoint's trainer.json, so a resumed run uses the stored lengths and is
bit-identical to the run never interrupted; a run resumed before a length was fixed measures again, with the step
times stored so far.

MARGIN (3%) of the time left is kept for speed noise. The clock still stops a run that gets slower than measured
after the last look: cut at 90% of the cosine, the LR is 1.2x its floor (the tail is flat), so noise costs a few
steps near the floor. Given both flags, S is the smaller of the two counts: whichever ends first ends the run, with the
schedule at its floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

WARMUP = 2  # warmup steps of a time-budgeted KD stage
SKIP = 2  # KD steps each process runs before timing any (compiling, first allocations)
CALIBRATION = 6  # KD steps before a time budget fixes the stage's length; steps [SKIP, CALIBRATION) are timed
LOOK_SPAN = 16  # the fewest steps a look after the first one measures (and the most it leaves unwatched)
MARGIN = 0.03  # share of the time left that a time budget keeps for speed noise (module docstring)
ENDINGS = {"max-tokens": "--max-tokens ended the run, its schedule at the floor",  # the summary's `stopped`
           "max-minutes": "--max-minutes ended the run, the schedule sized to fill it at the floor",
           "clock": "the --max-minutes clock ran out before the schedule's end",
           "ild-tokens": "--ild-tokens ended the run"}


def warmup_steps(steps: int, ratio: float) -> int:
    return max(1, round(ratio * steps))


def schedule(step: int, steps: int | None, warmup: int, floor: float, hold: int | None = None,
             bends: list[tuple[int, int]] = ()) -> float:
    """Multiplier for step `step` of a `steps`-step stage: linear warmup over `warmup` steps (the first step already
    moves), the peak held until step `hold` (default: the warmup's end), then cosine down to `floor` on the last
    step. steps None: the length is not known yet, the peak is held. bends [(R, S_before), ...]: the cosine was
    planned for S_before steps until it was re-planned at step R; from R it goes on from the angle of step R-1 to
    pi on the last step of the next plan (the next bend's S_before, or `steps`)."""
    if step < warmup:
        return (step + 1) / warmup
    start = warmup if hold is None else hold
    if steps is None or step < start:
        return 1.0
    plans = [before for _, before in bends] + [steps]  # the length in force in each stretch

    def angle(x: int, at: int, reached: float, plan: int) -> float:  # from `reached` at step `at` to pi at plan-1
        return reached + (math.pi - reached) * max(0.0, min(1.0, (x - at) / max(1, plan - 1 - at)))

    at, reached = start, 0.0
    for i, (r, _) in enumerate(bends):
        if step < r:
            return floor + (1 - floor) * 0.5 * (1 + math.cos(angle(step, at, reached, plans[i])))
        at, reached = r - 1, angle(r - 1, at, reached, plans[i])  # the last step run under plan i
    return floor + (1 - floor) * 0.5 * (1 + math.cos(angle(step, at, reached, plans[-1])))


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
    first_steps: int | None = None  # the length fixed at CALIBRATION (S1)
    replan_at: int | None = None  # R: the next look, where the length is fixed again (None: no more)
    mid_s: list[float] = field(default_factory=list)  # KD step seconds measured since the last look (or CALIBRATION)
    looks: list[list] = field(default_factory=list)  # [R, length before, length after, mean step s] per look

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
        bends = [(r, before) for r, before, *_ in self.looks]
        return schedule(k, self.steps, WARMUP, floor, hold=CALIBRATION, bends=bends)

    def record(self, k: int, done_here: int, seconds: float) -> None:
        """Keep the seconds of KD step k (run after `done_here - 1` KD steps in this process) if a length will be
        fixed from it: before CALIBRATION, or between CALIBRATION (or the last look) and the next look."""
        if not self.timed or done_here <= SKIP or k < 0:  # each process's first SKIP KD steps are not timed
            return
        if self.steps is None and k < CALIBRATION:
            self.step_s.append(seconds)
        elif self.replan_at is not None and CALIBRATION <= k < self.replan_at:
            self.mid_s.append(seconds)

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
        self.first_steps = self.steps
        half = (self.steps - CALIBRATION) // 2
        self.replan_at = CALIBRATION + half if half >= 2 else None
        return self.steps

    def replan_due(self, done: int) -> bool:
        """Whether the length is fixed again now, `done` KD steps into the stage."""
        return self.timed and self.replan_at is not None and done >= self.replan_at

    def replan(self, spent_s: float) -> int:
        """The length again, at the look R, from the speed since the last look (or the last speed measured, when a
        resume at R measured none) and the `spent_s` seconds used; never below R + 1. The next look comes halfway
        through what is left, if that half is at least LOOK_SPAN steps."""
        times = self.mid_s or ([self.looks[-1][3]] if self.looks else self.step_s)
        step_s = max(sum(times) / len(times), 1e-6) if times else 1e-6
        left = self.minutes * 60 - spent_s
        r, before = self.replan_at, self.steps
        steps = r + max(1, steps_to_fill(left, step_s, self.save_s or 0.0, self.save_every))
        self.steps = steps if self.cap is None else min(steps, self.cap)
        self.looks.append([r, before, self.steps, step_s])
        half = (self.steps - r) // 2
        self.replan_at, self.mid_s = (r + half if half >= LOOK_SPAN else None), []
        return self.steps

    def ended_by(self) -> str:
        """Which flag ended a stage that ran all its steps."""
        return "max-minutes" if self.timed and (self.cap is None or self.steps < self.cap) else "max-tokens"

    def state(self) -> dict:
        """What a checkpoint stores (trainer.json) and the run's summary reports."""
        return {"steps": self.steps, "cap": self.cap, "timed": self.timed, "step_s": self.step_s,
                "save_s": self.save_s, "calibration": CALIBRATION if self.timed else None,
                "margin": MARGIN if self.timed else None, "first_steps": self.first_steps,
                "replan_at": self.replan_at, "mid_s": self.mid_s, "looks": self.looks}

    def summary(self) -> dict:
        """For the run's summary: the length, what sized it, and the mean measured step."""
        mean = sum(self.step_s) / len(self.step_s) if self.step_s else None
        return {"by": "max-minutes" if self.timed else "max-tokens", "kd_steps": self.steps,
                "max_tokens_steps": self.cap, "measured_step_s": mean, "checkpoint_s": self.save_s,
                "margin": MARGIN if self.timed else None, "first_kd_steps": self.first_steps,
                "looks": [{"at": r, "steps_before": b, "steps_after": a, "step_s": s} for r, b, a, s in self.looks]}

    def load(self, state: dict) -> None:
        self.steps, self.step_s, self.save_s = state["steps"], list(state["step_s"]), state["save_s"]
        self.first_steps, self.replan_at = state.get("first_steps"), state.get("replan_at")
        self.mid_s, self.looks = list(state.get("mid_s", [])), [list(x) for x in state.get("looks", [])]
        if state.get("replanned") and not self.looks:  # a checkpoint of the one-look budget (before looks)
            mid = self.mid_s or self.step_s
            self.looks = [[self.replan_at, self.first_steps, self.steps, sum(mid) / max(1, len(mid))]]
            self.replan_at, self.mid_s = None, []

"""What a distillation run shows: one progress bar with each step's own numbers, and no library noise (the
libraries' own loading and writing bars; accelerate's warning on every checkpoint of a model with tied weights is
avoided by `ecomla.io.drop_tied_aliases`, registered as its save-state hook).

    with library_bars_off():
        model = load_model(...)                    # no "Loading weights" bar
    show(bar, row)                                 # "kd loss 0.8123, 412 tok/s, lr 9.70e-05"
"""

from __future__ import annotations

import contextlib

import datasets
from datasets.utils import are_progress_bars_disabled
from transformers.utils import logging as hf_logging


@contextlib.contextmanager
def library_bars_off():
    """Inside: transformers' and datasets' own progress bars off (loading weights, writing shards, map and filter),
    so the run's own bar is the one shown; each is restored as it was."""
    transformers_on, datasets_on = hf_logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if transformers_on:
            hf_logging.enable_progress_bar()
        if datasets_on:
            datasets.enable_progress_bars()


def show(bar, row: dict) -> None:
    """Advance the bar by one step and show that step's own loss, tokens/s and learning rate (no averages)."""
    speed = "-" if row.get("tokens_per_s") is None else f"{row['tokens_per_s']:.0f}"
    bar.set_postfix_str(f"{row['stage']} loss {row['loss']:.4f}, {speed} tok/s, lr {row['lr']:.2e}", refresh=False)
    bar.update(1)

"""A tqdm progress bar with the live batch loss on a terminal; silent otherwise."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def is_interactive() -> bool:
    return sys.stderr.isatty()


class EpochProgress:
    """One bar per epoch. The loss shown is read from the device every ``refresh`` batches
    only, so the bar does not force a host sync on every step."""

    def __init__(self, total_batches: int, *, enabled: bool, refresh: int = 10):
        self.enabled = enabled
        self.refresh = refresh
        self.total = total_batches
        self.bar = None
        self.done = 0

    def start(self, epoch: int, epochs: int) -> None:
        if self.enabled:
            self.bar = tqdm(total=self.total, desc=f"epoch {epoch}/{epochs}", leave=False, unit="batch",
                            dynamic_ncols=True)
        self.done = 0

    def update(self, done: int, state) -> None:
        if self.bar is None:
            return
        self.bar.update(done - self.done)
        self.done = done
        if done % self.refresh == 0 or done == self.total:
            sums = state.metrics  # for K stacked models, each field has K values: their mean loss
            self.bar.set_postfix(loss=f"{float(sums.loss.sum() / sums.count.sum()):.4f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def say(message: str, *, quiet: bool) -> None:
    if not quiet:
        tqdm.write(message, file=sys.stdout)

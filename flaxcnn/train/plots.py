"""PNG plots of a run (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(rows: Sequence[dict], path: Path, title: str) -> Path:
    """Loss and accuracy per epoch: training (mean per sample, train mode) and validation."""
    epochs = [r["epoch"] for r in rows]
    val_name = rows[-1].get("val_split", "val") if rows else "val"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = (("loss", "train_loss", "train (mean per sample)", "val_loss"),
              ("accuracy", "train_accuracy_running", "train (running, train mode)", "val_accuracy"))
    for ax, (ylabel, train_key, train_label, val_key) in zip(axes, panels):
        ax.plot(epochs, [r[train_key] for r in rows], label=train_label)
        ax.plot(epochs, [r[val_key] for r in rows], label=val_name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_lr_finder(lrs: Sequence[float], losses: Sequence[float], suggestion: float | None, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(lrs, losses)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("smoothed loss")
    if suggestion is not None:
        ax.axvline(suggestion, color="tab:red", linestyle="--", label=f"suggestion {suggestion:.3g}")
        ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""Training metrics: a JSONL file (always), TensorBoard (when installed), a PNG plot at the end.

One JSON object per line: `{"step": 12, "split": "train", "loss": 0.61, ...}`. On resume
the file is cut back to the checkpoint's step first, so a resumed run's metrics file equals
an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


class MetricsLogger:
    """Append metrics rows to `out_dir/metrics.jsonl` (and TensorBoard under `out_dir/tb`)."""

    def __init__(self, out_dir: str | os.PathLike, *, tensorboard: bool = True,
                 resume_step: int | None = None, final_eval_logged: bool = False):
        """resume_step: continue a run from its checkpoint at this step (rows logged after it
        are dropped). final_eval_logged: the checkpoint is the run's last one, after which
        the run logged its final evaluation at the same step; those eval rows go too, since
        the resumed run logs them again (or, extended, logs them at its own end)."""
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        if resume_step is None:
            self.path.write_text("")
        else:
            self.truncate_after(resume_step, drop_eval_at_step=final_eval_logged)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # tensorboard not installed: JSONL only
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(self.out_dir / "tb"))

    def truncate_after(self, step: int, drop_eval_at_step: bool = False) -> None:
        """Drop rows logged after `step` (they belong to a run that died before its next
        checkpoint and will be logged again), and with `drop_eval_at_step` the eval rows
        at `step` itself."""
        from .checkpoint import atomic_write_bytes

        if not self.path.exists():
            self.path.write_text("")
            return
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        rows = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                # A kill in the middle of `log` leaves a last line without its newline; it
                # was logged after the checkpoint, so it goes anyway. Anything else is damage.
                if number == len(lines) and not line.endswith("\n"):
                    break
                raise ValueError(f"{self.path}: line {number} is not valid JSON; cannot cut "
                                 f"the metrics back to step {step}") from None
        kept = [row for row in rows if row["step"] < step or (
            row["step"] == step and not (drop_eval_at_step and row.get("split") == "eval"))]
        # Atomic: a kill while rewriting must not lose the rows of the steps already done.
        atomic_write_bytes(self.path, "".join(json.dumps(row) + "\n" for row in kept).encode())

    def log(self, step: int, metrics: dict[str, float], *, split: str = "train") -> None:
        row = {"step": int(step), "split": split,
               **{k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(f"{split}/{key}", float(value), step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, or None when matplotlib is not
    installed (plots are optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    return plt


def plot_metrics(path: str | os.PathLike, png: str | os.PathLike) -> Path | None:
    """Plot loss and reward curves (train and eval) from a metrics JSONL file to `png`.

    Returns the PNG path, or None when matplotlib is not installed or there is nothing to plot.
    """
    plt = pyplot()
    if plt is None:
        return None
    rows = read_metrics(path)
    panels = [("loss", ["loss"]),
              ("rewards", ["rewards/chosen", "rewards/rejected", "rewards/margin"]),
              ("accuracy", ["rewards/accuracy", "policy/accuracy"])]
    panels = [(title, keys) for title, keys in panels
              if any(row.get(k) is not None for row in rows for k in keys)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for split, style in (("train", "-"), ("eval", "o--")):
            for key in keys:
                points = [(r["step"], r[key]) for r in rows
                          if r.get("split") == split and r.get(key) is not None]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, style, label=f"{split} {key}", markersize=4)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png

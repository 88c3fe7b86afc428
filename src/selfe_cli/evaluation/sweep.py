"""Step sweeps (README, `selfe eval`): one metric of one or more models at several step counts.

Writers for a Rich table, ``sweep.json``, ``sweep.csv`` and ``sweep.png`` (metric vs steps, log x
axis, one line per model). Rows are ``SweepRow(model, steps, metrics)``; ``metric`` names the
column that is plotted.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from selfe_cli.errors import UserError
from selfe_cli.recipes.schema import MAX_SAMPLE_STEPS


@dataclass
class SweepRow:
    model: str
    steps: int | None  # None: unknown (a scored folder without steps-<k> layout)
    metrics: dict[str, float] = field(default_factory=dict)


def parse_steps(text: str | Sequence[int]) -> list[int]:
    """``"1,2,4,50"`` -> [1, 2, 4, 50] (positive, unique, order kept)."""
    if not isinstance(text, str):
        items = [str(v) for v in text]
    else:
        items = [t for t in text.replace(" ", "").split(",") if t]
    out: list[int] = []
    for item in items:
        try:
            value = int(item)
        except ValueError:
            raise UserError(f"--steps: expected comma-separated positive integers such as 1,2,4,50, got {text!r}") from None
        if value < 1:
            raise UserError(f"--steps: step counts must be >= 1, got {value}")
        if value > MAX_SAMPLE_STEPS:
            raise UserError(f"--steps: step counts must be <= {MAX_SAMPLE_STEPS}, got {value}")
        if value not in out:
            out.append(value)
    if not out:
        raise UserError("--steps: give at least one step count, e.g. --steps 1,2,4,50")
    return out


def metric_columns(rows: Sequence[SweepRow]) -> list[str]:
    cols: list[str] = []
    for row in rows:
        for key in row.metrics:
            if key not in cols:
                cols.append(key)
    return cols


def sweep_table(rows: Sequence[SweepRow], title: str):
    from rich.table import Table

    cols = metric_columns(rows)
    table = Table(title=title)
    table.add_column("model")
    table.add_column("steps", justify="right")
    for col in cols:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(row.model, "-" if row.steps is None else str(row.steps), *(_fmt(row.metrics.get(c)) for c in cols))
    return table


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def write_json(rows: Sequence[SweepRow], path: str | os.PathLike, *, metric: str, extra: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"metric": metric, **(extra or {}),
               "rows": [{"model": r.model, "steps": r.steps, **r.metrics} for r in rows]}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def write_csv(rows: Sequence[SweepRow], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = metric_columns(rows)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["model", "steps", *cols])
        for r in rows:
            writer.writerow([r.model, "" if r.steps is None else r.steps, *(repr(float(r.metrics[c])) if c in r.metrics else "" for c in cols)])
    return path


def write_plot(rows: Sequence[SweepRow], path: str | os.PathLike, *, metric: str, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    models = list(dict.fromkeys(r.model for r in rows))
    all_steps: set[int] = set()
    for model in models:
        pts = sorted((r.steps, r.metrics[metric]) for r in rows
                     if r.model == model and metric in r.metrics and r.steps is not None)
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        all_steps.update(xs)
        ax.plot(xs, ys, marker="o", label=model)
    ax.set_xscale("log")
    if all_steps:
        ticks = sorted(all_steps)
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(metric)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if len(models) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_sweep(rows: Sequence[SweepRow], out_dir: str | os.PathLike, *, metric: str, title: str = "",
                extra: dict | None = None) -> dict[str, Path]:
    """``sweep.json``, ``sweep.csv`` and ``sweep.png`` in ``out_dir``."""
    out = Path(out_dir)
    return {
        "json": write_json(rows, out / "sweep.json", metric=metric, extra=extra),
        "csv": write_csv(rows, out / "sweep.csv"),
        "png": write_plot(rows, out / "sweep.png", metric=metric, title=title),
    }

"""Evaluation tables (CSV + JSON) and the FID-vs-step plot, written atomically."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from arcee.io import atomic_write_bytes


def write_table(rows: list[dict], prefix) -> dict:
    """Write `prefix.csv`, `prefix.json` and, when matplotlib is installed and some rows have a
    step, `prefix.png` (FID against training step). Returns {"csv", "json", "plot"} paths (plot may be None)."""
    prefix = Path(prefix)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    out = {"csv": prefix.with_suffix(".csv"), "json": prefix.with_suffix(".json"), "plot": None}
    atomic_write_bytes(out["csv"], buf.getvalue().encode())
    atomic_write_bytes(out["json"], json.dumps(rows, indent=2).encode())
    out["plot"] = plot_fid_vs_step(rows, prefix.with_suffix(".png"))
    return out


def plot_fid_vs_step(rows: list[dict], path) -> Path | None:
    """FID against training step, one line per (sampler settings) group. None when skipped."""
    pts = sorted((r["step"], r["fid"]) for r in rows if r.get("step") is not None and r.get("fid") is not None)
    if not pts:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; skipping the FID-vs-step plot (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot([s for s, _ in pts], [f for _, f in pts], marker="o")
    ax.set_xlabel("training step")
    ax.set_ylabel("FID")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)

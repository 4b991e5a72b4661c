"""Run logging: `<run>/metrics.jsonl` always, wandb when `logger.mode` is online or offline.

metrics.jsonl is append-only, one JSON object per line: training records carry `step`;
events carry `event` (start, resume, sample, checkpoint, preempted, done). After a resume,
records for steps past the checkpoint are repeated: the last record of a step wins
(`read_metrics` does that). With `logger.mode=disabled` wandb is never imported.
The wandb run id lives in `<run>/wandb_id.txt`, so a resumed run continues the same wandb run.
"""
from __future__ import annotations

import io
import json
import logging
import os
import time
import uuid
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger("arcee.train")
METRICS = "metrics.jsonl"
WANDB_ID = "wandb_id.txt"
LOSS_CURVE = "loss.png"


class RunLogger:
    """Main-process logger; on other processes every method is a no-op."""

    def __init__(self, run_dir, cfg, enabled: bool = True):
        self.run_dir, self.enabled, self.wandb = Path(run_dir), enabled, None
        if not enabled:
            return
        mode = str(cfg.logger.mode.value if hasattr(cfg.logger.mode, "value") else cfg.logger.mode)
        if mode != "disabled":  # first: a wandb failure leaves no metrics.jsonl behind
            self.wandb = _init_wandb(self.run_dir, cfg, mode)
        self._file = open(self.run_dir / METRICS, "a", encoding="utf-8")

    def log(self, record: dict, step: int | None = None) -> None:
        """Append `record` (+ wall time) to metrics.jsonl; numeric entries also go to wandb."""
        if not self.enabled:
            return
        record = ({} if step is None else {"step": step}) | record | {"time": round(time.time(), 3)}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.wandb is not None and step is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"},
                           step=step)

    def log_image(self, key: str, path, step: int) -> None:
        """A PNG written under the run folder: its relative path to metrics.jsonl, the image to wandb."""
        if not self.enabled:
            return
        rel = str(Path(path).relative_to(self.run_dir))
        self.log({"event": "sample", key: rel}, step=step)
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(str(path))}, step=step)

    def close(self, exit_code: int = 0) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=exit_code)
            self.wandb = None
        self.enabled = False


def read_metrics(run_dir) -> list[dict]:
    """Training records of metrics.jsonl, one per step (the last written wins), sorted by step.

    A torn last line (the process killed mid-write) is skipped.
    """
    by_step = {}
    path = Path(run_dir) / METRICS
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "step" in rec and "event" not in rec:
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def plot_loss_curve(run_dir, path=None) -> Path | None:
    """Training loss (and learning rate) against step from `<run>/metrics.jsonl` -> `<run>/loss.png` (atomic).

    Returns the PNG's path; None when there is nothing to plot yet, or without matplotlib (a
    one-line warning, once per process). Uses matplotlib's Agg canvas: no global backend change.
    """
    global _warned_no_matplotlib
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        if not _warned_no_matplotlib:
            log.warning("matplotlib is not installed: no %s in the run folder (pip install matplotlib)", LOSS_CURVE)
            _warned_no_matplotlib = True
        return None
    from arcee.io import atomic_write_bytes

    records = [r for r in read_metrics(run_dir) if "loss" in r]
    if not records:
        return None
    steps = [r["step"] for r in records]
    fig = Figure(figsize=(6, 3.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, [r["loss"] for r in records], color="C0", lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss", color="C0")
    ax.grid(alpha=0.3, which="both")
    if all("lr" in r for r in records):
        lr_ax = ax.twinx()
        lr_ax.plot(steps, [r["lr"] for r in records], color="C1", lw=1, ls="--")
        lr_ax.set_ylabel("learning rate", color="C1")
        lr_ax.set_ylim(bottom=0)
    ax.set_title(f"{Path(run_dir).absolute().name}: step {steps[-1]}, loss {records[-1]['loss']:.4f}", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path = Path(path) if path is not None else Path(run_dir) / LOSS_CURVE
    atomic_write_bytes(path, buf.getvalue())
    return path


_warned_no_matplotlib = False


def read_events(run_dir, event: str | None = None) -> list[dict]:
    """Event records of metrics.jsonl (optionally only those named `event`)."""
    out = []
    for line in (Path(run_dir) / METRICS).read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "event" in rec and (event is None or rec["event"] == event):
            out.append(rec)
    return out


def _init_wandb(run_dir: Path, cfg, mode: str):
    import wandb

    id_file = run_dir / WANDB_ID
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        tmp = id_file.with_suffix(".tmp")
        tmp.write_text(run_id + "\n")
        os.replace(tmp, id_file)
    lg = cfg.logger
    try:
        return wandb.init(
            project=lg.project or os.environ.get("WANDB_PROJECT") or "arcee",
            entity=lg.entity or os.environ.get("WANDB_ENTITY") or None,
            name=lg.run_name or f"{cfg.name}/{run_dir.name}",
            tags=list(lg.tags) or None,
            id=run_id, resume="allow", mode=mode, dir=str(run_dir),
            config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        )
    except Exception as e:
        raise RuntimeError(f"wandb.init failed with logger.mode={mode} ({type(e).__name__}: {e}); log in "
                           "(`wandb login`), or use logger.mode=offline / logger=disabled") from e

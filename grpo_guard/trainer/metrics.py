"""Metrics: one JSON line per training step (``<output_dir>/metrics.jsonl``) and the same numbers in TensorBoard.

A line holds ``step``, ``reward/<name>_mean|_std`` for every proxy and gold reward, ``reward/proxy_mean|_std``,
``updates`` (one entry per optimizer step: ``grad_norm``, ``skipped``, ``lr`` and ``timesteps``: per trained
timestep ``index, sigma, dt, loss, ratio_mean, ratio_std, clipfrac, approx_kl, kl, grad_norm``), timings and
``stored_mib`` (rollout storage on this process). TensorBoard gets the scalars flattened as
``t<index>/<field>`` (averaged over the step's updates).
"""
from __future__ import annotations

import json
import os
from typing import Dict


def flatten(record: Dict) -> Dict[str, float]:
    """The scalars of a record, with per-timestep fields averaged over updates as ``t<index>/<field>``."""
    flat = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    sums: Dict[str, list] = {}
    for u in record.get("updates", []):
        for key in ("grad_norm", "skipped", "lr"):
            sums.setdefault(f"train/{key}", []).append(float(u[key]))
        for t in u["timesteps"]:
            for key, val in t.items():
                if key not in ("index",):
                    sums.setdefault(f"t{t['index']}/{key}", []).append(float(val))
    flat.update({k: sum(v) / len(v) for k, v in sums.items()})
    return flat


class MetricsLogger:
    """Writes on the main process only. ``tensorboard`` needs the ``tensorboard`` package."""

    def __init__(self, output_dir: str, is_main: bool = True, tensorboard: bool = True):
        self.is_main = is_main
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.tb = None
        if is_main:
            os.makedirs(output_dir, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def log(self, step: int, record: Dict) -> None:
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(step=step, **record)) + "\n")
        if self.tb is not None:
            for k, v in flatten(record).items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines of steps > ``step`` (written after the checkpoint we resume from)."""
        if not self.is_main or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(self.path, "w") as f:
            f.writelines(keep)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read(path: str):
    """All records of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

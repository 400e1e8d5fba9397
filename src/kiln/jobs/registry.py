"""Which gradient job a config names.

Every job trained by the one gradient loop is built here from ``config.job``; the workflows and
the trainer never name a job. A new gradient job adds one entry.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from kiln.config import Config
from kiln.engine.job import TrainableJob
from kiln.jobs.lattice import LatticeJob
from kiln.jobs.lm import LMJob
from kiln.jobs.nca import NCAJob

Log = Callable[[str], None]
JobFactory = Callable[[Config, Path, torch.device, Log], TrainableJob]

GRADIENT_JOBS: dict[str, JobFactory] = {
    "lm": LMJob,
    "lattice": LatticeJob,
    "nca": NCAJob,
}


def build_gradient_job(
    config: Config, run_dir: Path, device: torch.device, log: Log
) -> TrainableJob:
    """The job ``config.job`` names, ready for the trainer."""
    return GRADIENT_JOBS[config.job](config, run_dir, device, log)

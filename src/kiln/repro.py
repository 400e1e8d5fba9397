"""Reproducibility: seeding, RNG capture and restore, determinism flags, thread pinning, and
the software versions that decide how operations round."""

from __future__ import annotations

import os
import platform
import random
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

import kiln


def pin_threads(threads: int) -> None:
    """Fix the intra-op thread count; float reductions differ in the last bits across counts."""
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def set_determinism(enabled: bool) -> None:
    """Turn on deterministic kernels (and cuBLAS's fixed workspace) or leave torch's defaults."""
    if enabled:
        # cuBLAS reads this when its handle is created, so set it before any CUDA work.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=False)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG state that can affect future results."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def software_versions() -> dict[str, str | None]:
    """Besides the machine and the thread count, what decides how each operation rounds."""
    return {
        "kiln": kiln.__version__,
        "kiln_commit": source_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def source_commit() -> str | None:
    """The git commit of Kiln's source tree, when it is a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(kiln.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None

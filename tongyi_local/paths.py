"""Where tongyi_local keeps its files: one home, read from the environment at call time."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "TONGYI_LOCAL_HOME"


def home_dir() -> Path:
    """``$TONGYI_LOCAL_HOME``, else ``~/.cache/tongyi_local`` (models, build cache)."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "tongyi_local")


def models_dir() -> Path:
    return home_dir() / "models"

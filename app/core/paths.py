"""Where Tailor keeps its files.

The library (adapters, runs in progress, trash) lives under TAILOR_HOME or a platformdirs user data dir; converted
base models live in a cache (TAILOR_CACHE or the platformdirs user cache dir) because they can be rebuilt.
"""

import os
from pathlib import Path

APP_NAME = "tailor"


def library_home(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("TAILOR_HOME"):
        return Path(os.environ["TAILOR_HOME"]).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def cache_home() -> Path:
    if os.environ.get("TAILOR_CACHE"):
        return Path(os.environ["TAILOR_CACHE"]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def resources_dir() -> Path:
    """The shipped resources: beside the package in a source checkout, inside the bundle in the frozen app."""
    import sys

    frozen_root = getattr(sys, "_MEIPASS", None)
    if frozen_root:
        return Path(frozen_root) / "resources"
    return Path(__file__).resolve().parents[2] / "resources"


def sample_dataset(name: str) -> Path:
    return resources_dir() / "datasets" / name

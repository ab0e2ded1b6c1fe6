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

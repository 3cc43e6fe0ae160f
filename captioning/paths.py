"""Where the repository and its assets are: every other module asks here, so that moving a
module between packages cannot silently change a default path.

The assets (ImageNet class names, the class -> caption word table and the default model) are
looked up in this order:

1. ``$CAPTIONING_MODEL``: a bundle folder to use as the default model;
2. the repository's ``assets/`` folder (a source checkout or an editable install);
3. the same files installed as the ``captioning_assets`` package (``pip install .``; the wheel
   maps ``assets/`` to it, see pyproject.toml), found without importing anything.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_ENV = "CAPTIONING_MODEL"
DEFAULT_MODEL_NAME = "show_attend_tell"


def _installed_assets() -> Path | None:
    spec = importlib.util.find_spec("captioning_assets")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def assets_dir() -> Path:
    """The repository's assets/ when it has the class names, else the installed copy (else the
    repository's path, so that a missing file is reported where a developer expects it)."""
    repo = REPO_ROOT / "assets"
    if (repo / "imagenet_classes.txt").is_file():
        return repo
    return _installed_assets() or repo


def default_model() -> Path:
    """$CAPTIONING_MODEL if set, else the shipped default bundle (models/show_attend_tell)."""
    env = os.environ.get(MODEL_ENV)
    return Path(env) if env else assets_dir() / "models" / DEFAULT_MODEL_NAME


ASSETS = assets_dir()
MODELS_DIR = ASSETS / "models"

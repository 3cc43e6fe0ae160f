"""Where the repository and its assets are: every other module asks here, so that moving a
module between packages cannot silently change a default path."""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ASSETS = REPO_ROOT / "assets"
MODELS_DIR = ASSETS / "models"

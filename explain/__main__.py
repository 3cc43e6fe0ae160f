"""``python -m explain ...``: see explain/cli.py."""
import sys

from .cli import main

sys.exit(main())

"""Neural image captioning: a frozen CNN encoder with Show-and-Tell, merge and
Show-Attend-and-Tell LSTM decoders, batched beam search, and safe model bundles."""
__version__ = "0.1.0"

from .api import Captioner, CaptionResult  # noqa: E402
from .decode_config import DecodeConfig  # noqa: E402

__all__ = ["Captioner", "CaptionResult", "DecodeConfig", "__version__"]

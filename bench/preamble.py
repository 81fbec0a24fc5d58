"""What every bench script needs before its other imports: the repository root importable (``bench``, ``tests.fakes``)
and Hugging Face offline (a benchmark never downloads). A script run as ``python bench/<name>.py`` has ``bench/`` as
``sys.path[0]``, so its first import is ``from preamble import ROOT``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: The repository root.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

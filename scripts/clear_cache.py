#!/usr/bin/env python3
"""Clear the decision cache (after a driver or library upgrade): `diffsynth-attention cache clear`.

Example: python scripts/clear_cache.py --yes                  # everything
         python scripts/clear_cache.py --gpu H100 --yes       # only decisions tuned on H100s
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from diffsynth_attention.tools.cli import main  # noqa: E402

sys.exit(main(["cache", "clear", *sys.argv[1:]]))

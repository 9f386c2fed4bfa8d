#!/usr/bin/env python3
"""Warm the decision cache ahead of time: `diffsynth-attention warm` (same options).

Example: python scripts/warm_cache.py --preset all            # the DiffSynth shape suite
         torchrun --nproc_per_node 8 scripts/warm_cache.py    # split across 8 GPUs, synced
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from diffsynth_attention.tools.cli import main  # noqa: E402

sys.exit(main(["warm", *sys.argv[1:]]))

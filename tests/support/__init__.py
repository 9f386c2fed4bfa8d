"""What several test modules share: input builders and references (``helpers``), fake kernel
packages (``fake_kernels``), the virtual clock and its fake backends (``virtual``), a backend that
fails on demand (``flaky``), the compile recorder (``compile_helpers``), store-only helpers for
torch-free subprocesses (``store_helpers``), DiffSynth-Studio's attention module (``diffsynth``),
tiny diffusers models (``diffusers_models``) and the context-parallel rank script run by path
(``cp_worker.py``).

Imported as ``from support.<module> import ...``: ``tests/`` is on ``sys.path`` under pytest (its
``conftest.py`` puts it there) and in the subprocesses that need it. This file imports nothing, so
the torch-free store subprocesses can import ``support.store_helpers``.
"""

"""Command-line tools: problem lists (:mod:`.shapes`), warming the cache (:mod:`.warm`) and the
``diffsynth-attention`` command (:mod:`.cli`)."""

"""Tuning one key: the fp32 reference and error metric (:mod:`.reference`), timing what the
caller pays (:mod:`.timing`), the rules as one value (:mod:`.policy`), the state of one tuning
(:mod:`.trial`) and the tuner's steps (:mod:`.tuner`)."""

from .policy import DEFAULT_POLICY, DEFAULT_TOLERANCES, TuningPolicy  # noqa: E402  (no torch import)

__all__ = ["DEFAULT_POLICY", "DEFAULT_TOLERANCES", "TuningPolicy"]

"""Tuning one key: the fp32 reference and error metric (:mod:`.reference`), timing what the
caller pays (:mod:`.timing`) and the tuner itself (:mod:`.tuner`)."""

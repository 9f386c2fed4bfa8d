"""Routing other code's attention here (:mod:`.patching`) and one set of decisions across
``torch.distributed`` ranks (:mod:`.distributed`)."""

"""Checkpoints on disk: the format (:mod:`.format`: save, load, rebuild the model), the optimizer
state kept for resuming (:mod:`.optimizer_state`), safetensors and JSON files (:mod:`.files`) and
atomic directory writes that survive a kill (:mod:`.atomic`)."""

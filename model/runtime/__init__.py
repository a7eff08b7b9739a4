"""How a program runs: command-line flags generated from config dataclasses (:mod:`.flags`) and the
device and precision a model runs with (:mod:`.device`). Shared by every program and the server."""

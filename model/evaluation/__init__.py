"""Measuring models and data: next-token baselines (:mod:`.baselines`), held-out NLL (:mod:`.nll`),
continuation metrics (:mod:`.continuation`) with the music figures a listener would notice
(:mod:`.music`) and their piano rolls (:mod:`.piano_roll`), and the tokenizer round trip
(:mod:`.fidelity`). Used by the programs (train, evaluate, ``python -m model.tokenizer``) and by
research; never by the server."""

"""Training: the corpus of a MIDI folder (:mod:`.corpus`), examples and batches (:mod:`.batches`),
the trainer (:mod:`.trainer`) and the run folder it writes (:mod:`.run_folder`)."""

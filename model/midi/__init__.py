"""MIDI files in and out: typed records (:mod:`.score`), reading with recovery of broken files
(:mod:`.read`, :mod:`.repair`) and writing (:mod:`.write`)."""

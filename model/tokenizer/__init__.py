"""The FM tokenizer: what a token is (:mod:`.vocabulary`), a piece as events and token ids
(:mod:`.sequences`), encoding and decoding (:mod:`.tokenizer`), token DNA (:mod:`.dna`) and the
stream decoder a live stream keeps (:mod:`.stream`). ``python -m model.tokenizer`` inspects files."""

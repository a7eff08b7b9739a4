"""Parts: in music written in parts, a part strikes one note at a time.

The note head (:class:`model.fm.note_head.NoteHead`) gives each chosen note a voice, and its chord
term makes a voice that already strikes at the note's onset less likely. Left to it, a chord's
second note still often lands in the voice that struck the first: the generated chords sat in one
voice 0.42 of the time against Bach's 0.10, and a fugue whose second voice had just entered went
on as one voice playing both lines. So, while sampling, a note that joins a chord is drawn
(:func:`free_voices`) from the first of these that has a voice:

1. the voices the stream has heard that do not strike there yet and stand on the note's side of
   each chord note (by their latest pitch: a note below the chord's top goes to a voice that was
   below it), so parts do not cross inside a chord;
2. while fewer than :data:`NEW_VOICES_UP_TO` voices have been heard, the voices not heard yet (a
   new part enters: the fugue's second voice);
3. a voice of the chord on the note's side of the others and above the note: two notes in one
   voice, as a keyboard hand plays them, rather than parts crossing;
4. the voices heard that do not strike there, on either side;
5. every voice, as the note head says, when none of those has one (a note above a chord of four
   parts), and always in a stream that writes its chords in one voice (a keyboard piece written
   as one track, a cello's double stops: :attr:`StreamDecoder.chords_in_one_voice` at least
   :data:`ONE_VOICE_CHORDS`, from the prompt, the notes played in and what was generated).

Voices a stream never plays (an accompaniment's) stay out whatever happens. The note head's
probabilities, the stream's temperature and random numbers choose among the voices left.
"""

from __future__ import annotations

import numpy as np

from model.tokenizer.stream import StreamDecoder
from model.tokenizer.voice_register import REGISTER_VOICES

NEW_VOICES_UP_TO = 4  # a chord too big for the parts heard opens new ones up to four parts
ONE_VOICE_CHORDS = 0.5  # a stream whose chords mostly sit in one voice keeps writing them so


def free_voices(decoders: list[StreamDecoder], tokens: list[int], max_voices: int) -> np.ndarray | None:
    """``(B, max_voices)`` bool: the voices each stream's next token (``tokens``) may take, by the
    rules of the module docstring (True everywhere for a token that is no note, or where the rules
    leave every voice open); None when that holds for every stream. Voices past the register's
    :data:`REGISTER_VOICES` count as never heard and never striking."""
    allowed = np.ones((len(decoders), max_voices), dtype=bool)
    tracked = min(max_voices, REGISTER_VOICES)
    narrowed = False
    for row, (decoder, token) in zip(allowed, zip(decoders, tokens)):
        onset = decoder.note_onset(token)
        habit = decoder.chords_in_one_voice
        if onset < 0 or (habit is not None and habit >= ONE_VOICE_CHORDS):
            continue
        register = decoder.register
        striking = np.zeros(max_voices, dtype=bool)
        heard = np.zeros(max_voices, dtype=bool)
        striking[:tracked] = register.onset[:tracked] == onset
        heard[:tracked] = register.pitch[:tracked] >= 0
        if not striking.any():
            continue
        pitch = np.full(max_voices, -1, dtype=np.int64)
        pitch[:tracked] = register.pitch[:tracked]
        new = decoder.tokenizer.vocab[token].a
        chord = pitch[striking]
        # a voice on the note's side of each chord note: below a note the chord has above it, ...
        in_order = (((pitch[:, None] > chord) == (new > chord)) | (chord == new)).all(axis=1)
        opening = ~heard & ~striking if heard.sum() < NEW_VOICES_UP_TO else np.zeros_like(heard)
        for free in (heard & in_order & ~striking, opening, heard & in_order, heard & ~striking):
            if free.any():
                row[:] = free
                narrowed = True
                break
    return allowed if narrowed else None


def keep_to_parts(banned: np.ndarray | None, allowed: np.ndarray | None) -> np.ndarray | None:
    """The voices to mask per stream: ``banned`` (True: the stream never plays it) and whatever
    :func:`free_voices` leaves out, except in a stream where together they would leave no voice
    (there only ``banned`` counts). None when nothing is masked."""
    if allowed is None or banned is None:
        return banned if allowed is None else ~allowed
    both = banned | ~allowed
    return np.where((~both).any(axis=1, keepdims=True), both, banned)

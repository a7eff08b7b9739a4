"""The Field Machine: token DNA -> projection x position code -> cumulative field(s) -> heads.

The deep machine (``ModelConfig.field_layers`` > 0, the default)::

    dna(23) = 7 floats + 16-dim voice embedding
    x_t     = Linear(23, width)(dna_t)                             (the residual stream)
    per layer l (model/fm/field_layer.py):
      field_l,t = lam * field_l,t-1 + Linear(width, F)(norm(x_t)) * pos(t)   (its own field)
      x_t      += Linear(F, width)(demod(field_l,t));  x_t += MLP(norm(x_t))
    h_t     = norm(x_t) -> next-token logits; note head(h_t, chosen token) -> voice, velocity

Each layer keeps its own field of ``F = dim / field_layers`` floats: a stream's state is still one
``dim``-float vector (the layers' fields side by side) and its position. Training is one
cumulative sum per layer; a step is one multiply-add per channel per layer. A later layer sums
what earlier layers *read*, not only token vectors, so the stack can keep apart what one sum
mixes (the alto's last note, the bass line, the current chord).

The one-field machine (``field_layers`` 0, the seed's design)::

    x_t     = Linear(23, dim)(dna_t) * pos(t)            (multiplied, not added)
    field_t = x_0 + ... + x_t                            (one cumsum for training)
    h_t     = decoder(readout(field_t [, x_t]))          (MLP)

Generation is O(1) per token: a stream's whole history is its field vector plus its position
(:class:`model.fm.state.FieldState`), and :meth:`model.fm.machine.FieldMachine.step` advances a batch of streams, each at its own
position, by one token. The position code is computed from a float64 angle, reduced modulo 2*pi
before the sine, so it stays exact at position 30,000 whatever dtype the weights use; the field
itself is kept in float32.

Readouts (``ModelConfig.readout``):

* ``field``: the seed's; the decoder reads the raw cumulative field.
* ``demod``: each (sin, cos) pair of the field is rotated back by the current position's angle, so
  the decoder sees history relative to *now*, and scaled by 1/sqrt(t+1).

``ModelConfig.direct`` adds a direct path: the current token's projection (before the position
code) is concatenated to the decoder's input.

``ModelConfig.decays`` splits the field into groups of channels that forget at different rates:
a group with time constant tau keeps ``field_t = lam * field_{t-1} + x_t`` with
``lam = exp(-1/tau)`` (tau 0: no decay, the seed's plain sum). The state is still one (B, D) row
per stream, ``step`` still O(1); the parallel pass computes the decayed sums with cumulative sums
inside chunks of ``DECAY_CHUNK`` positions (rescaled by ``lam**-i``, which stays finite there)
plus one carry per chunk. With ``demod``, a decayed group is scaled by 1/sqrt(min(t+1, tau)).

``ModelConfig.head = "factored"`` builds each token's output row from shared parts instead of
one free row per token: a row for its (kind, pitch), one for its (kind, duration) and one for its
(kind, bar position), summed, plus a per-token bias. The corpus has ~20 occurrences per vocabulary
entry, so a free row learns slowly; a shared pitch row learns from every note of that pitch. The
token -> parts table comes from the tokenizer (:meth:`FieldMachine.set_vocabulary`) and is saved
with the weights.

``ModelConfig.dna_lookup`` adds learned rows for the DNA's discrete values to its linear
projection: pitch (from pitch class and octave), pitch class, octave, duration, beat position
(the bar fraction, in 1/144ths) and velocity level, each recovered from the DNA floats. A linear
map of (sin, cos, octave) cannot single out one pitch; a row per pitch can. Still DNA in, one
vector out: the field and the step are unchanged.

``ModelConfig.field_dropout`` drops channels of the one-field decoder's view of the field while
training.

The note head (:mod:`.note_head`): a note's voice and velocity are predicted from ``h_t``
*together with the chosen token* (teacher-forced on the true one in training; generation samples
them after the token, with the stream's own random numbers). A head that never saw the note could
only name the most common voice.

Modules: :mod:`.config` (``ModelConfig``), :mod:`.state` (a stream's state and the model's
outputs), :mod:`.field` (position code, sums and readout of one field), :mod:`.field_layer` (one
residual field layer), :mod:`.machine` (the model), :mod:`.note_head` (voice and velocity),
:mod:`.lookup` and :mod:`.factored_head` (optional parts), :mod:`.loss` (the training loss).
"""

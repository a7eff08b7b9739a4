"""FM Server model package: MIDI reading, tokenizer, Field Machine, training and evaluation."""

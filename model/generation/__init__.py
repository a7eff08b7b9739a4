"""Batched generation: advancing many streams together (:mod:`.generator`), keeping to the token
grammar (:mod:`.grammar`), leaning toward what a stream heard (:mod:`.key_pull`) and giving a
chord's notes to different voices (:mod:`.parts`)."""

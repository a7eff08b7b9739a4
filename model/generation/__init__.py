"""Batched generation: advancing many streams together (:mod:`.generator`), keeping to the token
grammar (:mod:`.grammar`) and leaning toward what a stream heard (:mod:`.key_pull`)."""

"""Voices to channels, programs, and what silences the channels used."""

from __future__ import annotations

import pytest

from client.midi_channels import ChannelMap, parse_programs, silence


def test_voices_take_channels_1_to_16_leaving_out_the_drum_channel():
    default = ChannelMap()
    assert [default.channel(v) + 1 for v in range(16)] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16, 1]
    assert [ChannelMap(drums=None).channel(v) + 1 for v in range(16)] == list(range(1, 17))
    assert [ChannelMap(drums=1).channel(v) + 1 for v in range(3)] == [2, 3, 4]
    assert {ChannelMap(fixed=5).channel(v) for v in range(16)} == {4}


def test_each_channel_takes_the_program_of_its_voice():
    assert ChannelMap(programs=[0, None, 41] + [None] * 6 + [73]).channel_programs() == {0: 0, 2: 41, 10: 73}
    assert ChannelMap(fixed=3, programs=[None, 40, 41]).channel_programs() == {2: 40}


@pytest.mark.parametrize("text, programs", [
    ("0,40,41,42", [0, 40, 41, 42]), ("0,,41", [0, None, 41]), ("-, 5", [None, 5]), ("127", [127]),
], ids=["four", "empty-item", "dash", "one"])
def test_programs_parse(text, programs):
    assert parse_programs(text) == programs


@pytest.mark.parametrize("text, problem", [
    ("0,128", "voice 1: program 128"), ("piano", "voice 0: 'piano'"), ("1.5", "voice 0"), ("-1", "voice 0"),
    (",".join(["0"] * 17), "17 programs"),
], ids=["too-high", "name", "fraction", "negative", "too-many"])
def test_bad_programs_are_refused_naming_the_voice(text, problem):
    with pytest.raises(ValueError, match=problem):
        parse_programs(text)


def test_silence_releases_every_key_then_every_channel_used():
    assert silence([(0, 60), (10, 48)], {10, 0}) == [
        [0x80, 60, 0], [0x8A, 48, 0], [0xB0, 123, 0], [0xB0, 64, 0], [0xBA, 123, 0], [0xBA, 64, 0]]

"""Which MIDI channel each voice of a session plays on, the program it asks for, and how to silence
the channels that were used.

Channels are 0-15 here (status nibbles); people and the command line count them 1-16. By default
voice v plays on the v-th channel of 1..16 with the drum channel left out (General MIDI keeps
channel 10 for drums): voices 0-8 on channels 1-9, voices 9-14 on channels 11-16, and a 16th voice
wraps round to channel 1. ``--drums-channel`` moves the channel left out, or (``none``) gives the
voices all 16; ``--channel`` puts every voice on one channel.
"""

from __future__ import annotations

NOTE_OFF, NOTE_ON, CONTROL, PROGRAM = 0x80, 0x90, 0xB0, 0xC0
SUSTAIN, ALL_NOTES_OFF = 64, 123
GM_DRUM_CHANNEL = 10  # 1-16
CHANNELS = 16


class ChannelMap:
    """Voice -> channel (0-15), and the program each channel takes before its first note.

    ``fixed`` (1-16) puts every voice on that channel; otherwise the voices take the channels in
    order, leaving out ``drums`` (1-16, or None to leave none out). ``programs[v]`` (0-127 or None)
    is voice v's General MIDI program; where several voices share a channel the lowest voice with a
    program gives it.
    """

    def __init__(self, fixed: int | None = None, drums: int | None = GM_DRUM_CHANNEL,
                 programs: list[int | None] | None = None) -> None:
        if fixed is not None:
            self.order = [fixed - 1]
        else:
            self.order = [c for c in range(CHANNELS) if drums is None or c != drums - 1]
        self.programs = list(programs or [])

    def channel(self, voice: int) -> int:
        return self.order[voice % len(self.order)]

    def channel_programs(self) -> dict[int, int]:
        """Channel -> the program to send before its first note."""
        chosen: dict[int, int] = {}
        for voice, program in enumerate(self.programs):
            if program is not None:
                chosen.setdefault(self.channel(voice), program)
        return chosen


def parse_programs(text: str) -> list[int | None]:
    """``--programs``: comma-separated General MIDI programs 0-127 by voice; an empty item or ``-``
    leaves that voice's program alone (``0,,41`` = voice 0 piano, voice 2 viola)."""
    programs: list[int | None] = []
    for i, item in enumerate(text.split(",")):
        item = item.strip()
        if item in ("", "-"):
            programs.append(None)
            continue
        try:
            value = int(item)
        except ValueError:
            raise ValueError(f"voice {i}: {item!r} is not a program number 0-127") from None
        if not 0 <= value <= 127:
            raise ValueError(f"voice {i}: program {value} is outside 0-127")
        programs.append(value)
    if len(programs) > CHANNELS:
        raise ValueError(f"{len(programs)} programs given; a session has at most {CHANNELS} voices")
    return programs


def program_change(channel: int, program: int) -> list[int]:
    return [PROGRAM | channel, program]


def silence(sounding: list[tuple[int, int]], channels: set[int]) -> list[list[int]]:
    """What turns everything off: a note-off for each sounding (channel, pitch), then All Notes Off
    (CC 123) and sustain off (CC 64 = 0) on every channel used."""
    messages = [[NOTE_OFF | channel, pitch, 0] for channel, pitch in sounding]
    for channel in sorted(channels):
        messages += [[CONTROL | channel, ALL_NOTES_OFF, 0], [CONTROL | channel, SUSTAIN, 0]]
    return messages

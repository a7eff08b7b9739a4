// MIDI files in the browser, through the vendored @tonejs/midi (global `Midi`).

/** Reads a prompt file: {base64, notes, seconds, tracks}; throws if it is not a MIDI file with notes. */
export async function readPrompt(file) {
  const bytes = new Uint8Array(await file.arrayBuffer());
  let midi;
  try {
    midi = new Midi(bytes);
  } catch (err) {
    throw new Error(`${file.name} is not a MIDI file`);
  }
  const notes = midi.tracks.reduce((n, t) => n + t.notes.length, 0);
  if (!notes) throw new Error(`${file.name} holds no notes`);
  return { base64: toBase64(bytes), notes, seconds: midi.duration, tracks: midi.tracks.filter((t) => t.notes.length).length };
}

function toBase64(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

/**
 * Writes notes to a Standard MIDI File (Uint8Array).
 * notes: [{pitch, velocity, voice, t, d, played}] with t in unix seconds; origin: unix time of 0;
 * tempos: [{t, bpm}] in time order (the first applies from the start). One track per voice,
 * on the voice's channel, and one "played" track for the notes played here.
 */
export function writeMidi(notes, origin, tempos) {
  const midi = new Midi();
  const header = midi.header;
  header.tempos = [];
  for (const { t, bpm } of tempos.length ? tempos : [{ t: origin, bpm: 120 }]) {
    const at = Math.max(0, t - origin);
    // Ticks of this change under the tempos before it.
    const ticks = header.tempos.length ? header.secondsToTicks(at) : 0;
    if (header.tempos.length && ticks === header.tempos[header.tempos.length - 1].ticks) header.tempos.pop();
    header.tempos.push({ ticks, bpm });
    header.update();
  }
  const tracks = new Map();
  const trackFor = (n) => {
    const key = n.played ? "played" : n.voice;
    if (!tracks.has(key)) {
      const tr = midi.addTrack();
      tr.name = n.played ? "played" : `voice ${n.voice + 1}`;
      tr.channel = n.played ? 15 : n.voice % 16;
      tracks.set(key, tr);
    }
    return tracks.get(key);
  };
  for (const n of [...notes].sort((a, b) => a.t - b.t)) {
    if (n.d === null) continue;  // still held
    trackFor(n).addNote({
      midi: n.pitch,
      time: Math.max(0, n.t - origin),
      duration: Math.max(0.01, n.d),
      velocity: n.velocity / 127,
    });
  }
  return midi.toArray();
}

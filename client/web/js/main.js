// The FM Server page: wires the session, the synth, the piano roll and the keyboards together.
//
// Times: every note is kept with `t` in unix seconds. A server note's t is clock + start; a
// note played here is stamped with the wall clock and sent with start = t - clock.
// `window.fm` exposes counters for the browser tests and for curious musicians.

import { Session } from "./session.js";
import { Synth, wallNow } from "./synth.js";
import { PianoRoll, VOICE_COLOURS } from "./roll.js";
import { Keys, attachMidiInputs, noteName } from "./keyboard.js";
import { readPrompt, writeMidi } from "./midifile.js";
import { Bookmarks } from "./bookmarks.js";

const PLAYED_VOICE = 0;          // the voice played notes take in the session
const PROMPT_GAP_S = 10;         // a pause this long before a played note starts a new prompt
const MAX_PROMPT_NOTES = 4096;   // server/protocol.py MAX_PROMPT_NOTES
const SET_EVERY_MS = 120;        // how often a dragged control sends "set"

const $ = (id) => document.getElementById(id);
const ui = {
  start: $("start"), pause: $("pause"), bookmark: $("bookmark"), download: $("download"), mute: $("mute"), volume: $("volume"),
  url: $("ws-url"), apiKey: $("api-key"), dot: $("status-dot"), text: $("status-text"), notes: $("stat-notes"), session: $("stat-session"),
  headroom: $("stat-headroom"), hint: $("roll-hint"), legend: $("legend"), drop: $("drop"),
  file: $("prompt-file"), promptText: $("prompt-text"), promptClear: $("prompt-clear"),
  seed: $("seed"), dice: $("dice"), octave: $("octave"), accompany: $("accompany"),
};
const KNOBS = ["bpm", "temperature", "top_k", "top_p", "key_pull"];

const synth = new Synth();
const roll = new PianoRoll($("roll"));
const stats = { received: 0, played: 0, sent: 0, sets: 0, bookmarks: 0 };
const NEW_MODEL = "continued on a new model";
let session = null;
let state = "idle";              // idle | connecting | playing | paused
let bpm = Number($("bpm").value);
let tempos = [];                 // [{t, bpm}] for the downloaded file
let promptFile = null;           // {base64, name, notes, seconds}
let promptPlayed = [];           // notes played before a session, sent as prompt_notes
let pendingPlayed = [];          // played while reconnecting
let errorText = null;
let phaseText = "not connected";
let sessionNote = [];            // what the status line says of the session: from a bookmark, on a new model
let jumpTo = null;               // a bookmark to start from once the session playing now has stopped
const held = new Map();          // `${source}:${pitch}` -> {handle, note}
const voicesSeen = new Set();

// ------------------------------------------------------------------ server address
const params = new URLSearchParams(location.search);
ui.url.value = params.get("ws") ||
  (location.protocol.startsWith("http") ? `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`
                                        : "ws://127.0.0.1:8000/ws");
ui.apiKey.value = params.get("key") || "";

// The WebSocket address with the API key (browsers cannot set headers on a WebSocket).
function sessionUrl() {
  const url = ui.url.value.trim();
  const key = ui.apiKey.value.trim();
  if (!key) return url;
  try {
    const parsed = new URL(url);
    parsed.searchParams.set("api_key", key);
    return parsed.toString();
  } catch (err) {
    return url;  // the Session reports the bad address
  }
}

// ------------------------------------------------------------------ settings
function settings() {
  const s = {};
  for (const k of KNOBS) s[k] = Number($(k).value);
  if (ui.seed.value !== "") s.seed = Number(ui.seed.value);
  if (ui.accompany.checked) s.accompany = accompaniment();
  return s;
}

// "You play the melody, it plays the rest": the played voice is the model's to leave alone.
function accompaniment() {
  return { voices: ui.accompany.checked ? [PLAYED_VOICE] : [] };
}

let setTimer = null;
let setPending = {};
function sendSet(part, now = false) {
  Object.assign(setPending, part);
  if (!session || !session.live) return;
  const flush = () => {
    setTimer = null;
    if (!Object.keys(setPending).length) return;
    if (session && session.send({ type: "set", ...setPending })) stats.sets++;
    setPending = {};
  };
  if (now) {
    clearTimeout(setTimer);
    flush();
  } else if (!setTimer) {
    setTimer = setTimeout(flush, SET_EVERY_MS);
  }
}

const fmt = { bpm: (v) => `${Math.round(v)}`, temperature: (v) => v.toFixed(2), top_k: (v) => (v === 0 ? "all" : `${v}`),
              top_p: (v) => v.toFixed(2), key_pull: (v) => v.toFixed(1) };
for (const k of KNOBS) {
  const input = $(k);
  const out = $(`${k}-out`);
  const show = () => { out.textContent = fmt[k](Number(input.value)); };
  show();
  input.addEventListener("input", () => { show(); sendSet({ [k]: Number(input.value) }); });
  input.addEventListener("change", () => { show(); sendSet({ [k]: Number(input.value) }, true); });
}
ui.seed.addEventListener("change", () => {
  if (ui.seed.value !== "") sendSet({ seed: Math.max(0, Math.floor(Number(ui.seed.value))) }, true);
});
ui.accompany.addEventListener("change", () => sendSet({ accompany: accompaniment() }, true));
ui.dice.addEventListener("click", () => {
  ui.seed.value = Math.floor(Math.random() * 2 ** 31);
  sendSet({ seed: Number(ui.seed.value) }, true);
});

function showState(msg) {
  // The server's settings are the ones in force; leave alone a control the player is holding.
  for (const k of KNOBS) {
    const input = $(k);
    if (msg[k] === undefined || document.activeElement === input || k in setPending) continue;
    input.value = msg[k];
    $(`${k}-out`).textContent = fmt[k](Number(input.value));
  }
  if (msg.seed !== undefined && document.activeElement !== ui.seed) ui.seed.value = msg.seed;
  if (msg.accompany !== undefined && !("accompany" in setPending)) {
    ui.accompany.checked = Boolean(msg.accompany && msg.accompany.voices.length);
  }
  if (msg.bpm !== undefined && msg.bpm !== bpm) {
    bpm = msg.bpm;
    tempos.push({ t: wallNow(), bpm });
  }
  setPhase(msg.state === "paused" ? "paused" : "playing");
}

// ------------------------------------------------------------------ transport
ui.start.addEventListener("click", () => (session ? session.stop() : startSession()));
ui.pause.addEventListener("click", () => {
  if (!session) return;
  if (state === "paused") session.resume();
  else session.pause();
});
ui.download.addEventListener("click", download);
ui.bookmark.addEventListener("click", takeBookmark);

// ------------------------------------------------------------------ bookmarks
const bookmarks = new Bookmarks($("marks"), $("bookmarks"), { onJump: jumpBack });

function takeBookmark() {
  if (session && session.send({ type: "snapshot" })) stats.bookmarks++;
}

// Jump back: the session playing now stops, and a new one goes on from the bookmark with the
// page's settings; the roll keeps what has sounded.
function jumpBack(mark) {
  if (session) {
    jumpTo = mark;
    if (!session.stopping) session.stop();  // its "closed" starts the new one
  } else {
    startSession(mark);
  }
}

/** A new session: from `mark` (a bookmark) if given, else from the prompt or from nothing. */
function startSession(mark = null) {
  synth.ensure();
  errorText = null;
  sessionNote = [];
  const start = settings();
  if (mark) {
    start.snapshot = mark.id;
  } else if (promptFile) {
    start.prompt_midi = promptFile.base64;
  } else if (promptPlayed.length) {
    const t0 = promptPlayed[0].t;
    start.prompt_notes = promptPlayed.slice(-MAX_PROMPT_NOTES).map((n) => wireNote(n, t0));
  }
  stats.received = 0;
  if (mark) {  // the piece goes on from the bookmark: the roll and its voices stay
    if (start.bpm !== bpm) tempos.push({ t: wallNow(), bpm: start.bpm });
    bpm = start.bpm;
  } else {  // a new piece; notes played as its prompt stay on screen
    const keep = new Set(promptPlayed);
    roll.notes = roll.notes.filter((n) => keep.has(n) || n.d === null);
    roll.first = 0;
    voicesSeen.clear();
    drawLegend();
    bpm = start.bpm;
    tempos = [{ t: wallNow(), bpm }];
  }
  bookmarks.setCurrent(null);
  setPending = {};

  const s = (session = new Session(sessionUrl()));
  s.addEventListener("status", (e) => setPhase(e.detail.phase, e.detail.text));
  s.addEventListener("session", (e) => {
    const m = e.detail;
    tempos[0].t = Math.min(tempos[0].t, m.clock);
    if (m.snapshot) {
      sessionNote.push("from bookmark");  // the list marks which
      bookmarks.setCurrent(m.snapshot);
    }
    // A rolling restart moved the session onto another checkpoint: same place, maybe another character.
    if (m.reread && !sessionNote.includes(NEW_MODEL)) sessionNote.push(NEW_MODEL);
    setPhase("playing", m.resumed ? "resumed" : null);
    if (pendingPlayed.length) {
      s.notes(pendingPlayed.map((n) => wireNote(n, m.clock)));
      stats.sent += pendingPlayed.length;
      pendingPlayed = [];
    }
    if (Object.keys(setPending).length) sendSet({}, true);
  });
  s.addEventListener("state", (e) => showState(e.detail));
  s.addEventListener("snapshot", (e) => bookmarks.add(e.detail, ui.url.value.trim()));
  s.addEventListener("notes", (e) => onNotes(e.detail.notes, s.clock));
  s.addEventListener("error", (e) => {
    const text = (errorText = `${e.detail.code}: ${e.detail.message}`);
    console.warn("server error", e.detail);
    showStatus();
    setTimeout(() => {  // a note the model could not read is news, not a state; a refused start stays
      if (errorText === text && session === s) {
        errorText = null;
        showStatus();
      }
    }, 6000);
  });
  s.addEventListener("closed", (e) => {
    if (session !== s) return;
    session = null;
    promptPlayed = [];
    pendingPlayed = [];
    showPrompt();
    // Stop means silence now: notes that arrived ahead of their time are neither heard nor kept.
    synth.silence();
    const now = wallNow();
    roll.notes = roll.notes.filter((n) => n.played || n.t <= now);
    roll.first = 0;
    const reason = e.detail.reason;
    sessionNote = [];
    bookmarks.setCurrent(null);
    setPhase(reason === "stopped" ? "idle" : "error",
             reason === "stopped" ? "stopped" : reason === "expired" ? "session expired" : null);
    if (jumpTo) {
      const mark = jumpTo;
      jumpTo = null;
      startSession(mark);
    }
  });
  setPhase("connecting", "connecting…");
  s.start(start);
}

function wireNote(n, origin) {
  return {
    pitch: n.pitch,
    velocity: n.velocity,
    start: Math.max(0, n.t - origin),
    duration: Math.min(60, Math.max(0.02, n.d)),
    voice: n.voice,
  };
}

function onNotes(list, clock) {
  const now = wallNow();
  let lead = Infinity;
  for (const w of list) {
    const note = { pitch: w.pitch, velocity: w.velocity, voice: w.voice, t: clock + w.start, d: w.duration,
                   played: false };
    roll.add(note);
    synth.schedule(note);
    lead = Math.min(lead, note.t - now);
    if (!voicesSeen.has(w.voice)) {
      voicesSeen.add(w.voice);
      drawLegend();
    }
  }
  stats.received += list.length;
  if (list.length) {
    const last = list[list.length - 1];
    roll.setBeatAnchor(clock + last.start, last.beat, bpm);
    showHeadroom(lead);
  }
  ui.notes.textContent = `${stats.received.toLocaleString()} notes${stats.sent ? ` · ${stats.sent} played` : ""}`;
  ui.download.disabled = false;
  ui.hint.classList.add("gone");
}

function showHeadroom(lead) {
  ui.headroom.textContent = `headroom ${lead.toFixed(2)} s`;
  ui.headroom.className = lead < 0 ? "late" : lead < 0.1 ? "low" : "ok";
}

function setPhase(phase, text = null) {
  state = phase === "error" ? "idle" : phase;
  const live = phase === "playing" || phase === "paused" || phase === "connecting";
  ui.start.classList.toggle("stop", live);
  ui.start.querySelector(".label").textContent = live ? "Stop" : "Start";
  ui.start.querySelector(".icon").innerHTML = live ? "&#9632;" : "&#9654;";
  ui.pause.disabled = !(phase === "playing" || phase === "paused");
  ui.bookmark.disabled = ui.pause.disabled;
  ui.pause.querySelector(".label").textContent = phase === "paused" ? "Resume" : "Pause";
  ui.pause.querySelector(".icon").innerHTML = phase === "paused" ? "&#9654;" : "&#10074;&#10074;";
  ui.dot.className = `dot ${phase === "playing" ? "live" : phase}`;
  phaseText = text || { playing: "playing", paused: "paused", connecting: "connecting…", idle: "not connected",
                        error: "error" }[phase];
  showStatus();
}

function showStatus() {
  const note = sessionNote.length && (state === "playing" || state === "paused") ? ` · ${sessionNote.join(" · ")}` : "";
  ui.text.textContent = `${phaseText}${note}${errorText ? ` — ${errorText}` : ""}`;
  ui.text.title = `${ui.text.textContent} (${ui.url.value})`;
  ui.session.textContent = session && session.id ? `session ${String(session.id).slice(0, 8)}` : "";
}

function download() {
  const notes = roll.notes.filter((n) => n.d !== null);
  if (!notes.length) return;
  const origin = Math.min(session && session.clock !== null ? session.clock : Infinity, ...notes.map((n) => n.t));
  const bytes = writeMidi(notes, origin, tempos.length ? tempos : [{ t: origin, bpm }]);
  const blob = new Blob([bytes], { type: "audio/midi" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  const stamp = new Date().toISOString().slice(0, 19).replace(/[-:]/g, "").replace("T", "-");
  a.download = `fm-session-${stamp}.mid`;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10_000);
}

// ------------------------------------------------------------------ output
ui.volume.addEventListener("input", () => {
  synth.setVolume(Number(ui.volume.value));
  if (synth.muted) toggleMute(false);
});
ui.mute.addEventListener("click", () => toggleMute(!synth.muted));
function toggleMute(m) {
  synth.setMuted(m);
  ui.mute.setAttribute("aria-pressed", String(m));
}
window.addEventListener("keydown", (e) => {
  const t = e.target;
  if (e.repeat || e.ctrlKey || e.metaKey || e.altKey) return;
  if (t && (t.tagName === "INPUT" && t.type !== "range" || t.tagName === "SELECT" || t.tagName === "BUTTON")) return;
  if (e.code === "KeyM") toggleMute(!synth.muted);
  else if (e.code === "KeyB") takeBookmark();
  else if (e.code === "Space") {
    e.preventDefault();
    ui.start.click();
  }
});

// ------------------------------------------------------------------ playing
function onDown(pitch, velocity, source) {
  const key = `${source}:${pitch}`;
  if (held.has(key)) return;
  synth.ensure();
  const note = { pitch, velocity, voice: PLAYED_VOICE, t: wallNow(), d: null, played: true };
  roll.add(note);
  held.set(key, { handle: synth.noteOn(pitch, velocity), note });
  keys.press(pitch, true);
  ui.hint.classList.add("gone");
}

function onUp(pitch, source) {
  const key = `${source}:${pitch}`;
  const h = held.get(key);
  if (!h) return;
  held.delete(key);
  synth.noteOff(h.handle);
  keys.press(pitch, [...held.values()].some((o) => o.note.pitch === pitch));
  const note = h.note;
  note.d = Math.max(0.02, wallNow() - note.t);
  stats.played++;
  if (session && session.live) {
    session.notes([wireNote(note, session.clock)]);
    stats.sent++;
  } else if (session) {
    pendingPlayed.push(note);
  } else if (!promptFile) {
    const last = promptPlayed[promptPlayed.length - 1];
    if (last && note.t - (last.t + last.d) > PROMPT_GAP_S) promptPlayed = [];
    promptPlayed.push(note);
    showPrompt();
  }
}

const keys = new Keys($("keys"), { onDown, onUp });
$("keys").addEventListener("octave", (e) => { ui.octave.textContent = noteName(e.detail); });
$("oct-down").addEventListener("click", () => shiftOctave(-12));
$("oct-up").addEventListener("click", () => shiftOctave(12));
function shiftOctave(d) {
  keys.releaseAll();
  keys.setOctave(keys.base + d);
  ui.octave.textContent = noteName(keys.base);
}
ui.octave.textContent = noteName(keys.base);
attachMidiInputs($("midi-input"), $("midi-in"), { onDown, onUp });

// ------------------------------------------------------------------ prompt
ui.drop.addEventListener("click", (e) => { if (e.target !== ui.promptClear) ui.file.click(); });
ui.drop.addEventListener("keydown", (e) => { if (e.key === "Enter") ui.file.click(); });
ui.file.addEventListener("change", () => ui.file.files[0] && choosePrompt(ui.file.files[0]));
for (const t of ["dragenter", "dragover"]) {
  window.addEventListener(t, (e) => { e.preventDefault(); ui.drop.classList.add("over"); });
}
window.addEventListener("dragleave", (e) => { if (!e.relatedTarget) ui.drop.classList.remove("over"); });
window.addEventListener("drop", (e) => {
  e.preventDefault();
  ui.drop.classList.remove("over");
  const f = e.dataTransfer && e.dataTransfer.files[0];
  if (f) choosePrompt(f);
});
ui.promptClear.addEventListener("click", (e) => {
  e.stopPropagation();
  promptFile = null;
  promptPlayed = [];
  ui.file.value = "";
  showPrompt();
});

async function choosePrompt(file) {
  ui.drop.classList.remove("error");
  try {
    promptFile = { ...(await readPrompt(file)), name: file.name };
    promptPlayed = [];
    showPrompt();
  } catch (err) {
    promptFile = null;
    showPrompt(err.message);
  }
}

function showPrompt(error = null) {
  ui.drop.classList.toggle("error", Boolean(error));
  ui.drop.classList.toggle("has", Boolean(promptFile || promptPlayed.length));
  ui.promptClear.hidden = !(promptFile || promptPlayed.length);
  if (error) {
    ui.promptText.textContent = error;
  } else if (promptFile) {
    ui.promptText.textContent = `Prompt: ${promptFile.name} — ${promptFile.notes} notes, ${promptFile.seconds.toFixed(1)} s`;
  } else if (promptPlayed.length) {
    const last = promptPlayed[promptPlayed.length - 1];
    const secs = last.t + last.d - promptPlayed[0].t;
    ui.promptText.textContent = `Prompt: ${promptPlayed.length} played notes, ${secs.toFixed(1)} s — Start to continue them`;
  } else {
    ui.promptText.innerHTML = "Prompt: drop or <u>choose</u> a .mid, or play before you start";
  }
  ui.promptText.title = ui.promptText.textContent;
}

function drawLegend() {
  ui.legend.textContent = "";
  for (const v of [...voicesSeen].sort((a, b) => a - b)) {
    const s = document.createElement("span");
    s.innerHTML = `<i style="background:${VOICE_COLOURS[v % VOICE_COLOURS.length]}"></i>voice ${v + 1}`;
    ui.legend.appendChild(s);
  }
  const p = document.createElement("span");
  p.innerHTML = `<i class="played"></i>played`;
  ui.legend.appendChild(p);
}

// ------------------------------------------------------------------ frames
function frame() {
  keys.show(roll.draw());
  requestAnimationFrame(frame);
}
drawLegend();
setPhase("idle");
requestAnimationFrame(frame);

window.fm = {
  get stats() {
    return { ...stats, ...synth.stats, frames: roll.frames, state, clock: session ? session.clock : null };
  },
  get session() { return session; },
  roll,
  synth,
  bookmarks,
};

// Scrolling piano roll on a canvas: time runs right to left past a playhead; notes that have
// arrived but not yet sounded wait to its right. Server notes are coloured by voice; notes played
// here are white with a magenta edge. The pitch range follows the notes on screen.

import { wallNow } from "./synth.js";

export const VOICE_COLOURS = [
  "#4cc9f0", "#ffd166", "#80ed99", "#f78c6b", "#b388ff", "#06d6a0", "#ff8fab", "#9bb1ff",
  "#e9c46a", "#2ec4b6", "#f4a261", "#c77dff", "#90e0ef", "#caffbf", "#ffadad", "#a0c4ff",
];
const PLAYED_FILL = "#ffffff";
const PLAYED_EDGE = "#f72585";
const KEYS_W = 34;          // the pitch strip on the left
const PLAYHEAD = 0.72;      // share of the width left of the playhead
const MIN_SPAN = 25;        // semitones always shown
const BLACK = new Set([1, 3, 6, 8, 10]);

export class PianoRoll {
  constructor(canvas) {
    this.canvas = canvas;
    this.g = canvas.getContext("2d");
    this.notes = [];          // {pitch, velocity, voice, t, d (null while held), played}
    this.pxPerSec = 110;
    this.lo = 48;             // shown pitch range (eased toward the notes in view)
    this.hi = 84;
    this.beat = null;         // {t, beat, bpm}: maps beats to unix time for the grid
    this.first = 0;           // index of the first note that may still be on screen
    this.frames = 0;
    this._resize();
    new ResizeObserver(() => this._resize()).observe(canvas);
  }

  add(note) {
    this.notes.push(note);
  }

  clear() {
    this.notes = [];
    this.first = 0;
    this.beat = null;
  }

  setBeatAnchor(t, beat, bpm) {
    this.beat = { t, beat, bpm };
  }

  _resize() {
    const dpr = window.devicePixelRatio || 1;
    const r = this.canvas.getBoundingClientRect();
    this.w = Math.max(1, r.width);
    this.h = Math.max(1, r.height);
    this.canvas.width = Math.round(this.w * dpr);
    this.canvas.height = Math.round(this.h * dpr);
    this.g.setTransform(dpr, 0, 0, dpr, 0, 0);
  }

  /** Draws one frame at wall time `now`; returns the pitches sounding now as Map(pitch -> colour). */
  draw(now = wallNow()) {
    const { g, w, h } = this;
    const x0 = KEYS_W;
    const headX = x0 + (w - x0) * PLAYHEAD;
    const tLeft = now - (headX - x0) / this.pxPerSec;
    const tRight = now + (w - headX) / this.pxPerSec;
    const xOf = (t) => headX + (t - now) * this.pxPerSec;

    // Notes that can be on screen; notes arrive roughly in start order, so skip the old prefix.
    while (this.first < this.notes.length) {
      const n = this.notes[this.first];
      const end = n.d === null ? now : n.t + n.d;
      if (end >= tLeft - 30) break;
      this.first++;
    }
    const vis = [];
    let lo = 128, hi = -1;
    for (let i = this.first; i < this.notes.length; i++) {
      const n = this.notes[i];
      const end = n.d === null ? now : n.t + n.d;
      if (end < tLeft || n.t > tRight) continue;
      vis.push(n);
      if (n.pitch < lo) lo = n.pitch;
      if (n.pitch > hi) hi = n.pitch;
    }
    this._fitRange(lo, hi);
    const rows = this.hi - this.lo + 1;
    const rowH = h / rows;
    const yOf = (p) => h - (p - this.lo + 1) * rowH;

    // Background: key rows, octave lines, beat grid.
    g.fillStyle = "#0e1219";
    g.fillRect(0, 0, w, h);
    for (let p = Math.floor(this.lo); p <= Math.ceil(this.hi); p++) {
      const y = yOf(p);
      if (BLACK.has(((p % 12) + 12) % 12)) {
        g.fillStyle = "#0a0d13";
        g.fillRect(x0, y, w - x0, rowH);
      }
      if (p % 12 === 0) {
        g.fillStyle = "#1c2430";
        g.fillRect(x0, y + rowH - 1, w - x0, 1);
      }
    }
    if (this.beat && this.beat.bpm > 0) {
      const spb = 60 / this.beat.bpm;
      const b0 = Math.ceil(this.beat.beat + (tLeft - this.beat.t) / spb);
      const b1 = this.beat.beat + (tRight - this.beat.t) / spb;
      for (let b = b0; b <= b1; b++) {
        const x = Math.round(xOf(this.beat.t + (b - this.beat.beat) * spb)) + 0.5;
        g.fillStyle = b % 4 === 0 ? "#222c3a" : "#161d27";
        g.fillRect(x, 0, 1, h);
      }
    }

    // Future side of the playhead: a faint band showing what has arrived but not yet sounded.
    const fut = g.createLinearGradient(headX, 0, w, 0);
    fut.addColorStop(0, "rgba(76,201,240,0.05)");
    fut.addColorStop(1, "rgba(76,201,240,0)");
    g.fillStyle = fut;
    g.fillRect(headX, 0, w - headX, h);

    // Notes.
    const sounding = new Map();
    const nh = Math.max(2, rowH - 2);
    for (const n of vis) {
      const end = n.d === null ? now : n.t + n.d;
      const xa = Math.max(x0, xOf(n.t));
      const xb = xOf(end);
      if (xb <= x0) continue;
      const y = yOf(n.pitch) + (rowH - nh) / 2;
      const on = n.t <= now && now < end;
      const wid = Math.max(2, xb - xa - 1);
      const colour = n.played ? PLAYED_FILL : VOICE_COLOURS[n.voice % VOICE_COLOURS.length];
      if (on) sounding.set(n.pitch, n.played ? PLAYED_EDGE : colour);
      g.globalAlpha = (n.t > now ? 0.45 : 0.55 + 0.45 * (n.velocity / 127)) * (on ? 1 : 0.85);
      if (on) {
        g.shadowColor = n.played ? PLAYED_EDGE : colour;
        g.shadowBlur = 12;
      }
      g.fillStyle = colour;
      roundRect(g, xa, y, wid, nh, Math.min(3, nh / 2));
      g.fill();
      g.shadowBlur = 0;
      if (n.played) {
        g.globalAlpha = 1;
        g.strokeStyle = PLAYED_EDGE;
        g.lineWidth = 2;
        roundRect(g, xa + 1, y + 1, Math.max(1, wid - 2), Math.max(1, nh - 2), Math.min(3, nh / 2));
        g.stroke();
      } else if (wid > 6) {
        g.globalAlpha = 0.5;
        g.fillStyle = "#ffffff";
        g.fillRect(xa, y, 2, nh);  // onset tick
      }
    }
    g.globalAlpha = 1;

    // Playhead.
    g.fillStyle = "rgba(255,255,255,0.9)";
    g.fillRect(Math.round(headX), 0, 2, h);
    g.fillStyle = "rgba(255,255,255,0.12)";
    g.fillRect(Math.round(headX) - 4, 0, 10, h);

    this._drawKeys(g, h, rowH, yOf, sounding);
    this.frames++;
    return sounding;
  }

  _fitRange(lo, hi) {
    let tlo, thi;
    if (hi < 0) {
      tlo = this.lo;
      thi = this.hi;
    } else {
      tlo = lo - 3;
      thi = hi + 3;
      const span = thi - tlo + 1;
      if (span < MIN_SPAN) {
        const pad = (MIN_SPAN - span) / 2;
        tlo -= pad;
        thi += pad;
      }
    }
    tlo = Math.max(0, tlo);
    thi = Math.min(127, thi);
    // Ease toward the target so the view breathes instead of jumping.
    this.lo += (tlo - this.lo) * 0.06;
    this.hi += (thi - this.hi) * 0.06;
  }

  _drawKeys(g, h, rowH, yOf, sounding) {
    g.fillStyle = "#131820";
    g.fillRect(0, 0, KEYS_W, h);
    for (let p = Math.floor(this.lo); p <= Math.ceil(this.hi); p++) {
      const y = yOf(p);
      const black = BLACK.has(((p % 12) + 12) % 12);
      const lit = sounding.get(p);
      g.fillStyle = lit || (black ? "#1d232d" : "#c9d1dc");
      g.fillRect(black ? 0 : 2, y + 0.5, black ? KEYS_W * 0.62 : KEYS_W - 4, Math.max(1, rowH - 1));
      if (p % 12 === 0 && rowH > 5) {
        g.fillStyle = "#5b6677";
        g.font = `${Math.min(10, rowH + 2)}px system-ui, sans-serif`;
        g.textBaseline = "middle";
        g.fillText(`C${p / 12 - 1}`, KEYS_W - 20, y + rowH / 2);
      }
    }
    g.fillStyle = "#252e3b";
    g.fillRect(KEYS_W - 1, 0, 1, h);
  }
}

function roundRect(g, x, y, w, h, r) {
  g.beginPath();
  g.moveTo(x + r, y);
  g.arcTo(x + w, y, x + w, y + h, r);
  g.arcTo(x + w, y + h, x, y + h, r);
  g.arcTo(x, y + h, x, y, r);
  g.arcTo(x, y, x + w, y, r);
  g.closePath();
}

// Ways to play: the computer keyboard (a DAW-style row: A W S E D F T G Y H U J K O L P ;),
// the on-screen keyboard (mouse or touch), and Web MIDI inputs when the browser has them.
// Each calls onDown(pitch, velocity, source) and onUp(pitch, source).

const ROW = ["KeyA", "KeyW", "KeyS", "KeyE", "KeyD", "KeyF", "KeyT", "KeyG", "KeyY", "KeyH", "KeyU", "KeyJ",
             "KeyK", "KeyO", "KeyL", "KeyP", "Semicolon"];
const LABEL = { Semicolon: ";" };
const BLACK = new Set([1, 3, 6, 8, 10]);
const NAMES = ["C", "C♯", "D", "D♯", "E", "F", "F♯", "G", "G♯", "A", "A♯", "B"];
export const noteName = (p) => `${NAMES[p % 12]}${Math.floor(p / 12) - 1}`;

export class Keys {
  constructor(el, { onDown, onUp }) {
    this.el = el;
    this.onDown = onDown;
    this.onUp = onUp;
    this.base = 60;               // pitch of the A key
    this.held = new Map();        // code -> pitch, for the computer keyboard
    this.pointer = new Map();     // pointerId -> pitch
    this.keyEls = new Map();      // pitch -> element
    this.lit = new Map();         // pitch -> colour shown as "sounding"
    this.build();
    new ResizeObserver(() => this.build()).observe(el);
    el.addEventListener("pointerdown", (e) => this._pointer(e, true));
    el.addEventListener("pointerover", (e) => e.buttons && this._pointer(e, true));
    for (const t of ["pointerup", "pointercancel", "pointerout"]) el.addEventListener(t, (e) => this._pointer(e, false));
    window.addEventListener("keydown", (e) => this._key(e, true));
    window.addEventListener("keyup", (e) => this._key(e, false));
    window.addEventListener("blur", () => this.releaseAll());
  }

  /** Lays out as many octaves as fit, centred on the computer keyboard's octave. */
  build() {
    const width = this.el.clientWidth || 800;
    const octaves = Math.max(2, Math.min(6, Math.floor(width / 190)));
    let lo = this.base - 12 * Math.floor((octaves - 1) / 2);
    lo = Math.max(12, Math.min(120 - 12 * octaves, lo));
    const hi = lo + 12 * octaves;
    if (this.range && this.range[0] === lo && this.range[1] === hi) return;
    this.range = [lo, hi];
    this.el.textContent = "";
    this.keyEls.clear();
    const whites = [];
    for (let p = lo; p <= hi; p++) if (!BLACK.has(p % 12)) whites.push(p);
    const ww = 100 / whites.length;
    for (let p = lo; p <= hi; p++) {
      const k = document.createElement("div");
      k.dataset.pitch = p;
      k.title = noteName(p);
      if (BLACK.has(p % 12)) {
        k.className = "key black";
        const left = whites.indexOf(p - 1) + 1;
        k.style.left = `calc(${left * ww}% - ${ww * 0.3}%)`;
        k.style.width = `${ww * 0.6}%`;
      } else {
        k.className = "key white";
        if (p % 12 === 0) {
          const c = document.createElement("span");
          c.className = "cname";
          c.textContent = noteName(p);
          k.appendChild(c);
        }
      }
      this.el.appendChild(k);
      this.keyEls.set(p, k);
    }
    this._labels();
    this._paint(this.lit);
  }

  setOctave(base) {
    this.base = Math.max(24, Math.min(96, base));
    this.build();
    this._labels();
  }

  _labels() {
    for (const el of this.el.querySelectorAll(".hint")) el.remove();
    ROW.forEach((code, i) => {
      const k = this.keyEls.get(this.base + i);
      if (!k) return;
      const s = document.createElement("span");
      s.className = "hint";
      s.textContent = LABEL[code] || code.slice(3);
      k.appendChild(s);
    });
  }

  /** Lights the keys sounding now (Map pitch -> colour); pressed keys keep their own look. */
  show(lit) {
    this._paint(lit, this.lit);
    this.lit = lit;
  }

  _paint(lit, before = new Map()) {
    for (const [p, el] of this.keyEls) {
      const c = lit.get(p);
      if (c === before.get(p) && el.classList.contains("on") === Boolean(c)) continue;
      el.classList.toggle("on", Boolean(c));
      if (c) el.style.setProperty("--key-on", c);
    }
  }

  press(p, on) {
    const el = this.keyEls.get(p);
    if (el) el.classList.toggle("pressed", on);
  }

  releaseAll() {
    for (const [code, p] of this.held) this.onUp(p, "keys");
    this.held.clear();
    for (const [id, p] of this.pointer) this.onUp(p, "screen");
    this.pointer.clear();
  }

  _key(e, down) {
    const t = e.target;
    if (t && (t.isContentEditable || (t.tagName === "INPUT" && t.type !== "range") || t.tagName === "SELECT")) return;
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    if (down && !e.repeat && (e.code === "KeyZ" || e.code === "KeyX")) {
      this.releaseAll();
      this.setOctave(this.base + (e.code === "KeyZ" ? -12 : 12));
      this.el.dispatchEvent(new CustomEvent("octave", { detail: this.base }));
      e.preventDefault();
      return;
    }
    const i = ROW.indexOf(e.code);
    if (i < 0) return;
    e.preventDefault();
    if (down) {
      if (e.repeat || this.held.has(e.code)) return;
      const p = this.base + i;
      this.held.set(e.code, p);
      this.onDown(p, 96, "keys");
    } else {
      const p = this.held.get(e.code);
      if (p === undefined) return;
      this.held.delete(e.code);
      this.onUp(p, "keys");
    }
  }

  _pointer(e, down) {
    const k = e.target.closest?.(".key");
    if (down) {
      if (!k) return;
      e.preventDefault();
      this.el.releasePointerCapture?.(e.pointerId);
      const p = Number(k.dataset.pitch);
      if (this.pointer.get(e.pointerId) === p) return;
      this._pointerUp(e.pointerId);
      // Harder toward the front of the key, like a real one.
      const r = k.getBoundingClientRect();
      const vel = Math.round(60 + 60 * Math.min(1, Math.max(0, (e.clientY - r.top) / r.height)));
      this.pointer.set(e.pointerId, p);
      this.onDown(p, vel, "screen");
    } else if (e.type !== "pointerout" || (k && !k.contains(e.relatedTarget))) {
      this._pointerUp(e.pointerId);
    }
  }

  _pointerUp(id) {
    const p = this.pointer.get(id);
    if (p === undefined) return;
    this.pointer.delete(id);
    this.onUp(p, "screen");
  }
}

/** Lists Web MIDI inputs in `select` and feeds the chosen one to onDown/onUp. */
export async function attachMidiInputs(select, wrap, { onDown, onUp }) {
  if (!navigator.requestMIDIAccess) return null;
  wrap.hidden = false;
  let access;
  try {
    access = await navigator.requestMIDIAccess();
  } catch (err) {
    select.disabled = true;
    select.title = `Web MIDI unavailable: ${err.message || err}`;
    return null;
  }
  let current = null;
  const list = () => {
    const keep = select.value;
    select.textContent = "";
    select.append(new Option("none", ""));
    for (const inp of access.inputs.values()) select.append(new Option(inp.name, inp.id));
    select.value = [...access.inputs.keys()].includes(keep) ? keep : "";
  };
  const choose = () => {
    if (current) current.onmidimessage = null;
    current = access.inputs.get(select.value) || null;
    if (!current) return;
    current.onmidimessage = (m) => {
      const [st, p, v] = m.data;
      const kind = st & 0xf0;
      if (kind === 0x90 && v > 0) onDown(p, v, "midi");
      else if (kind === 0x80 || (kind === 0x90 && v === 0)) onUp(p, "midi");
    };
  };
  list();
  access.onstatechange = list;
  select.addEventListener("change", choose);
  return access;
}

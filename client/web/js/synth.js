// A small two-operator FM synth on WebAudio: one timbre per voice, a generated reverb, a
// compressor, volume and mute. Nothing is loaded: every sound is computed here.
//
// Server notes are scheduled at their start on the session clock: a note at unix time t is
// scheduled at the AudioContext time that will be *heard* at t (getOutputTimestamp maps context
// time to performance time, which performance.timeOrigin maps to unix time).

export const wallNow = () => (performance.timeOrigin + performance.now()) / 1000;

// carrier:modulator ratio, modulation index at the attack and after `decay` s, envelope, pan.
const TIMBRES = [
  { ratio: 1, index: 2.4, indexEnd: 0.35, attack: 0.004, decay: 1.4, sustain: 0.38, release: 0.35, pan: -0.2 },   // e-piano
  { ratio: 2, index: 1.3, indexEnd: 0.5, attack: 0.006, decay: 0.9, sustain: 0.45, release: 0.3, pan: 0.25 },     // reed
  { ratio: 0.5, index: 1.6, indexEnd: 0.6, attack: 0.005, decay: 1.1, sustain: 0.55, release: 0.3, pan: -0.4 },   // warm bass
  { ratio: 3.5, index: 2.6, indexEnd: 0.2, attack: 0.002, decay: 1.8, sustain: 0.2, release: 0.6, pan: 0.4 },     // bell
  { ratio: 1.5, index: 1.0, indexEnd: 0.4, attack: 0.01, decay: 1.0, sustain: 0.5, release: 0.3, pan: 0.05 },     // hollow
];
const PLAYED = { ratio: 1, index: 3.0, indexEnd: 0.5, attack: 0.003, decay: 1.2, sustain: 0.42, release: 0.3, pan: 0 };

const midiHz = (p) => 440 * 2 ** ((p - 69) / 12);

export class Synth {
  constructor() {
    this.ctx = null;
    this.volume = 0.7;
    this.muted = false;
    this.sounding = new Set();   // handles of notes not yet ended (for silence())
    this.stats = { scheduled: 0, late: 0, dropped: 0, live: 0 };
  }

  /** Creates (or wakes) the AudioContext; call from a user gesture where the browser asks for one. */
  ensure() {
    if (!this.ctx) this._build();
    if (this.ctx.state === "suspended") this.ctx.resume();
    return this.ctx;
  }

  _build() {
    const ctx = (this.ctx = new AudioContext({ latencyHint: "interactive" }));
    this.out = ctx.createGain();
    this.out.gain.value = this.muted ? 0 : this.volume;
    const comp = ctx.createDynamicsCompressor();
    comp.threshold.value = -16;
    comp.knee.value = 12;
    comp.ratio.value = 4;
    comp.attack.value = 0.004;
    comp.release.value = 0.2;
    comp.connect(this.out).connect(ctx.destination);
    this.dry = ctx.createGain();
    this.dry.connect(comp);
    const reverb = ctx.createConvolver();
    reverb.buffer = this._impulse(2.4);
    const wet = ctx.createGain();
    wet.gain.value = 0.22;
    reverb.connect(wet).connect(comp);
    this.send = reverb;
    this.buses = new Map();
  }

  // A stereo room: exponentially decaying noise, darker as it decays.
  _impulse(seconds) {
    const rate = this.ctx.sampleRate;
    const n = Math.floor(rate * seconds);
    const buf = this.ctx.createBuffer(2, n, rate);
    for (let c = 0; c < 2; c++) {
      const data = buf.getChannelData(c);
      let lp = 0;
      for (let i = 0; i < n; i++) {
        const t = i / n;
        const coef = 0.25 + 0.7 * t;  // one-pole low-pass closing over time
        lp += (1 - coef) * ((Math.random() * 2 - 1) - lp);
        data[i] = lp * (1 - t) ** 3.2 * (i < rate * 0.01 ? i / (rate * 0.01) : 1);
      }
    }
    return buf;
  }

  _bus(key, pan) {
    let bus = this.buses.get(key);
    if (!bus) {
      bus = this.ctx.createStereoPanner();
      bus.pan.value = pan;
      bus.connect(this.dry);
      bus.connect(this.send);
      this.buses.set(key, bus);
    }
    return bus;
  }

  setVolume(v) {
    this.volume = v;
    this._applyGain();
  }

  setMuted(m) {
    this.muted = m;
    this._applyGain();
  }

  _applyGain() {
    if (!this.ctx) return;
    const g = this.out.gain;
    g.cancelScheduledValues(this.ctx.currentTime);
    g.setTargetAtTime(this.muted ? 0 : this.volume, this.ctx.currentTime, 0.02);
  }

  /** Context time heard at unix time `t` (seconds). */
  audioTime(t) {
    const ctx = this.ctx;
    const ts = ctx.getOutputTimestamp ? ctx.getOutputTimestamp() : null;
    if (ts && ts.performanceTime > 0 && ts.contextTime > 0) {
      return ts.contextTime + (t * 1000 - (performance.timeOrigin + ts.performanceTime)) / 1000;
    }
    return ctx.currentTime + (t - wallNow());
  }

  /** Schedules a note {pitch, velocity, voice, t (unix start), d (seconds)}; false if it is over. */
  schedule(note) {
    const ctx = this.ensure();
    let when = this.audioTime(note.t);
    let dur = note.d;
    const now = ctx.currentTime;
    if (when < now) {
      if (when + dur < now + 0.02) {
        this.stats.dropped++;
        return false;
      }
      if (now - when > 0.02) this.stats.late++;
      dur -= now - when;
      when = now;
    }
    const timbre = TIMBRES[note.voice % TIMBRES.length];
    const pan = Math.max(-0.8, Math.min(0.8, timbre.pan * (note.voice >= TIMBRES.length ? -1 : 1)));
    const h = this._voice(note.pitch, note.velocity, timbre, this._bus(`v${note.voice}`, pan), when);
    this._release(h, when + Math.max(dur, 0.03));
    this.stats.scheduled++;
    return true;
  }

  /** Starts a note now and keeps it until noteOff(handle). */
  noteOn(pitch, velocity) {
    const ctx = this.ensure();
    this.stats.live++;
    return this._voice(pitch, velocity, PLAYED, this._bus("played", 0), ctx.currentTime);
  }

  noteOff(h) {
    if (h) this._release(h, this.ctx.currentTime);
  }

  /** Fades out every note, scheduled or held. */
  silence() {
    if (!this.ctx) return;
    const now = this.ctx.currentTime;
    for (const h of this.sounding) {
      h.amp.gain.cancelScheduledValues(now);
      h.amp.gain.setTargetAtTime(0, now, 0.03);
      for (const o of h.oscs) o.stop(now + 0.25);
    }
    this.sounding.clear();
  }

  _voice(pitch, velocity, tb, bus, when) {
    const ctx = this.ctx;
    const f = midiHz(pitch);
    const vel = Math.max(1, Math.min(127, velocity)) / 127;
    // Brighter when struck harder, duller up high (keeps the top from aliasing).
    const bright = (0.55 + 0.7 * vel) * Math.max(0.25, Math.min(1.2, 1 - (pitch - 64) / 70));
    const car = ctx.createOscillator();
    car.frequency.value = f;
    const mod = ctx.createOscillator();
    mod.frequency.value = f * tb.ratio;
    const depth = ctx.createGain();
    depth.gain.setValueAtTime(tb.index * bright * f, when);
    depth.gain.exponentialRampToValueAtTime(Math.max(1e-3, tb.indexEnd * bright * f), when + tb.decay);
    mod.connect(depth).connect(car.frequency);
    const amp = ctx.createGain();
    const peak = 0.2 * vel ** 1.4 * (pitch < 48 ? 1.25 : 1);
    amp.gain.setValueAtTime(0, when);
    amp.gain.linearRampToValueAtTime(peak, when + tb.attack);
    amp.gain.setTargetAtTime(peak * tb.sustain, when + tb.attack, tb.decay / 3);
    car.connect(amp).connect(bus);
    car.start(when);
    mod.start(when);
    const h = { amp, oscs: [car, mod], nodes: [car, mod, depth, amp], release: tb.release };
    car.onended = () => {
      for (const n of h.nodes) n.disconnect();
      this.sounding.delete(h);
    };
    this.sounding.add(h);
    return h;
  }

  _release(h, at) {
    const g = h.amp.gain;
    if (at <= this.ctx.currentTime + 0.005) {
      at = this.ctx.currentTime;
      const v = g.value;
      g.cancelScheduledValues(at);
      g.setValueAtTime(v, at);
    }
    g.setTargetAtTime(0, at, h.release / 4);
    for (const o of h.oscs) o.stop(at + h.release * 1.6);
  }
}

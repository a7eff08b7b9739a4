// One generation session over the server's /ws protocol (see server/protocol.py).
//
//   open  -> send {"type":"start", settings..., prompt | snapshot}
//   recv  {"type":"session", clock, resume_token, lookahead, snapshot, reread} -> event "session"
//   recv  {"type":"state", state, bpm, ...}                   -> event "state"
//   recv  {"type":"notes", notes:[{pitch, velocity, voice, start, duration, beat}]} -> event "notes"
//   send  {"type":"set"|"notes"|"pause"|"resume"}              while live
//   send  {"type":"snapshot"} -> recv {"type":"snapshot", id, beat, expires_in} -> event "snapshot"
//   send  {"type":"stop"} -> recv {"type":"stopped"} -> close 1000 -> event "closed"
//
// An error before the first "session" reply refuses the start (an unknown bookmark, a bad prompt):
// the session ends with reason "error". A connection that drops without "stopped" is reopened with
// {"type":"start", resume_token, last_beat} (the server keeps a dropped session for 60 s, and sends
// no note at or before last_beat, the latest beat received here); the session clock does not change.
// Events are DOM CustomEvents with the message in `detail`; "status" carries {phase, text}.

const RESUME_WINDOW_S = 60;
const BACKOFF_S = [0.25, 0.5, 1, 2, 3, 5];

export class Session extends EventTarget {
  constructor(url) {
    super();
    this.url = url;
    this.ws = null;
    this.clock = null;        // unix seconds of session time 0
    this.token = null;
    this.id = null;
    this.lookahead = null;
    this.stopping = false;
    this.ended = false;
    this.lastBeat = null;     // the highest beat of the notes received (a resume's last_beat)
    this.droppedAt = null;    // wall time the connection dropped (for the resume window)
    this.attempt = 0;
    this.retryTimer = null;
  }

  get live() { return this.ws !== null && this.ws.readyState === WebSocket.OPEN && this.clock !== null; }

  /** Opens the connection and starts a session with `start` (settings and prompt fields). */
  start(start) {
    this._open({ type: "start", ...start });
  }

  send(msg) {
    if (!this.live) return false;
    this.ws.send(JSON.stringify(msg));
    return true;
  }

  set(settings) { return this.send({ type: "set", ...settings }); }
  notes(notes) { return this.send({ type: "notes", notes }); }
  pause() { return this.send({ type: "pause" }); }
  resume() { return this.send({ type: "resume" }); }

  /** Asks the server to end the stream; closes at once if it is not connected. */
  stop() {
    this.stopping = true;
    clearTimeout(this.retryTimer);
    if (this.live) {
      this.ws.send(JSON.stringify({ type: "stop" }));
      // The server answers "stopped" and closes; do not wait on a server that never does.
      setTimeout(() => this._finish("stopped"), 3000);
    } else {
      this._finish("stopped");
    }
  }

  _open(first) {
    this._emit("status", { phase: "connecting", text: this.token ? "reconnecting…" : "connecting…" });
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (err) {
      this._emit("status", { phase: "error", text: `bad server address: ${this.url}` });
      this._finish("error");
      return;
    }
    this.ws = ws;
    ws.onopen = () => ws.send(JSON.stringify(first));
    ws.onmessage = (ev) => this._onMessage(ev);
    ws.onclose = (ev) => this._onClose(ws, ev);
    ws.onerror = () => {};  // a close event always follows and carries what happened
  }

  _onMessage(ev) {
    let msg;
    try {
      msg = JSON.parse(ev.data);
    } catch {
      return;
    }
    switch (msg.type) {
      case "session":
        this.clock = msg.clock;
        this.token = msg.resume_token;
        this.id = msg.id;
        this.lookahead = msg.lookahead;
        this.droppedAt = null;
        this.attempt = 0;
        this._emit("session", msg);
        break;
      case "stopped":
        this._emit("stopped", msg);
        this._finish("stopped");
        break;
      case "notes":
        for (const n of msg.notes) if (this.lastBeat === null || n.beat > this.lastBeat) this.lastBeat = n.beat;
        this._emit("notes", msg);
        break;
      case "error":
        this._emit("error", msg);
        if (msg.code === "unknown_resume_token") this._finish("expired");
        else if (this.clock === null) this._finish("error");  // the start was refused
        break;
      default:
        this._emit(msg.type, msg);
    }
  }

  _onClose(ws, ev) {
    if (ws !== this.ws || this.ended) return;
    this.ws = null;
    if (this.stopping || ev.code === 1000) {
      this._finish("stopped");
      return;
    }
    if (ev.code === 1013) {
      this._emit("status", { phase: "error", text: "server full — try again shortly" });
      this._finish("error");
      return;
    }
    if (ev.code === 1008 && (ev.reason === "unauthorized" || ev.reason === "forbidden")) {
      const text = ev.reason === "unauthorized" ? "the server needs its API key (⚙)" : "the server refused this page";
      this._emit("status", { phase: "error", text });
      this._finish("error");
      return;
    }
    if (!this.token) {
      this._emit("status", { phase: "error", text: `cannot reach ${this.url}` });
      this._finish("error");
      return;
    }
    // Dropped mid-session: come back with the resume token while the server still holds it.
    const now = Date.now() / 1000;
    if (this.droppedAt === null) this.droppedAt = now;
    if (now - this.droppedAt > RESUME_WINDOW_S) {
      this._emit("status", { phase: "error", text: "connection lost" });
      this._finish("expired");
      return;
    }
    this._emit("dropped", {});
    const delay = BACKOFF_S[Math.min(this.attempt++, BACKOFF_S.length - 1)];
    this._emit("status", { phase: "connecting", text: `connection lost — retrying in ${delay} s` });
    const again = { type: "start", resume_token: this.token };
    if (this.lastBeat !== null) again.last_beat = this.lastBeat;
    this.retryTimer = setTimeout(() => this._open(again), delay * 1000);
  }

  _finish(reason) {
    if (this.ended) return;
    this.ended = true;
    clearTimeout(this.retryTimer);
    const ws = this.ws;
    this.ws = null;
    if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000);
    this._emit("closed", { reason });
  }

  _emit(type, detail) { this.dispatchEvent(new CustomEvent(type, { detail })); }
}

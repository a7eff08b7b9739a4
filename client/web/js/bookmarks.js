// Bookmarks: moments of a session the server keeps ({"type":"snapshot"} answers an id), listed
// newest first. Clicking one asks to jump back to it (the page starts a new session from it).
// The list lives for the page's lifetime and in localStorage, so it outlasts a reload; the
// server keeps each one --bookmark-seconds (its `expires_in`), and one it no longer has is
// refused with "unknown_snapshot" when clicked.

const STORAGE_KEY = "fm.bookmarks";
const KEPT = 100;                 // the newest this many are listed and stored

export class Bookmarks {
  /** `list`: the <ol> to draw into, in `panel` (hidden while the list is empty); `onJump(mark)`
   *  when one is clicked. */
  constructor(panel, list, { onJump }) {
    this.panel = panel;
    this.list = list;
    this.onJump = onJump;
    this.marks = this._load();    // [{id, beat, at (ms), expires (ms), server}], newest first
    this.current = null;          // the id the playing session started from
    this.draw();
  }

  /** Adds the server's answer to {"type":"snapshot"}, made on `server`; returns the entry. */
  add(reply, server) {
    const at = Date.now();
    const mark = { id: reply.id, beat: reply.beat, at, expires: at + reply.expires_in * 1000, server };
    this.marks = [mark, ...this.marks.filter((m) => m.id !== mark.id)].slice(0, KEPT);
    this._save();
    this.draw();
    return mark;
  }

  find(id) { return this.marks.find((m) => m.id === id) || null; }

  forget(id) {
    this.marks = this.marks.filter((m) => m.id !== id);
    this._save();
    this.draw();
  }

  setCurrent(id) {
    this.current = id;
    this.draw();
  }

  draw() {
    this.list.textContent = "";
    this.panel.hidden = !this.marks.length;
    const now = Date.now();
    for (const m of this.marks) {
      const li = document.createElement("li");
      li.className = "mark";
      li.classList.toggle("current", m.id === this.current);
      li.classList.toggle("expired", m.expires <= now);
      const jump = document.createElement("button");
      jump.className = "jump";
      jump.dataset.id = m.id;
      jump.textContent = label(m);
      jump.title = `Jump back: a new session goes on from here (kept${m.server ? ` by ${m.server}` : ""} until ` +
                   `${new Date(m.expires).toLocaleString()})`;
      jump.addEventListener("click", () => this.onJump(m));
      const forget = document.createElement("button");
      forget.className = "forget btn icon-only small";
      forget.title = "Remove from this list";
      forget.innerHTML = "&#10005;";
      forget.addEventListener("click", () => this.forget(m.id));
      li.append(jump, forget);
      this.list.appendChild(li);
    }
  }

  _load() {
    try {
      const saved = JSON.parse(localStorage.getItem(STORAGE_KEY) || "[]");
      return Array.isArray(saved) ? saved.filter(isMark).slice(0, KEPT) : [];
    } catch (err) {  // storage off (a private window, file://) or not ours: the list starts empty
      console.warn("bookmarks not read from localStorage:", err);
      return [];
    }
  }

  _save() {
    try {
      localStorage.setItem(STORAGE_KEY, JSON.stringify(this.marks));
    } catch (err) {  // storage off or full: the list lasts as long as the page
      console.warn("bookmarks not saved to localStorage:", err);
    }
  }
}

/** "14:03:22 · beat 37.5": when it was made, and where in the music. */
function label(mark) {
  const time = new Date(mark.at).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  return `${time} · beat ${Math.round(mark.beat * 10) / 10}`;
}

function isMark(m) {
  return m && typeof m.id === "string" && typeof m.beat === "number" && typeof m.at === "number" &&
         typeof m.expires === "number";
}

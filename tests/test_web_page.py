"""The browser page (client/web) in real headless Chromium against a real server.

Python playwright drives Debian's /usr/bin/chromium (never a downloaded browser). The server runs in
a thread (``live_server``), so playwright's sync API owns this thread. Every test fails on a console
error, an uncaught exception, or a request to anything but loopback. Screenshots go to
``tests/artifacts/`` (git-ignored).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import statistics
import time
from pathlib import Path
from urllib.parse import urlparse

import mido
import pytest

from server.config import ServerConfig
from tests.cluster_harness import redis_server
from tests.midi_builders import build_midi
from tests.server_harness import running_server
from tests.timing import ARTIFACTS

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--autoplay-policy=no-user-gesture-required"]
LOOPBACK = {"127.0.0.1", "localhost", "[::1]", "::1"}


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.fail(f"{CHROMIUM} not found: run `make test-deps` (installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


class PageUnderTest:
    """A page on the live server with what it logged, requested and sent over its WebSocket."""

    def __init__(self, page, base_url: str) -> None:
        self.page = page
        self.base_url = base_url
        self.problems: list[str] = []
        self.requests: list[str] = []
        self.sent: list[dict] = []
        self.received: list[dict] = []
        self.sockets: list[dict] = []  # per WebSocket the page opened: its "url", "sent" and "received"
        page.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text}"))
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: self.problems.append(f"request failed: {r.url} {r.failure}"))
        page.on("request", lambda r: self.requests.append(r.url))
        page.on("websocket", self._socket)

    def _socket(self, ws) -> None:
        frames = {"url": ws.url, "sent": [], "received": []}
        self.sockets.append(frames)

        def record(direction: str, every: list[dict]):
            def on_frame(payload) -> None:
                message = json.loads(payload)
                every.append(message)
                frames[direction].append(message)
            return on_frame
        ws.on("framesent", record("sent", self.sent))
        ws.on("framereceived", record("received", self.received))

    def sent_of(self, kind: str) -> list[dict]:
        return [m for m in self.sent if m.get("type") == kind]

    def socket_where(self, test) -> dict:
        """The frames of the first WebSocket for which ``test(frames)`` holds."""
        return next(frames for frames in self.sockets if test(frames))

    def until(self, condition, what: str, timeout: float = 30.0) -> None:
        """Waits (letting the page run) until ``condition()`` holds; fails naming ``what``."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"{what}; sent {self.sent[-5:]}, received {self.received[-3:]}"
            self.page.wait_for_timeout(50)

    def stats(self) -> dict:
        return self.page.evaluate("() => window.fm.stats")

    def start(self, notes: int = 12, timeout_ms: int = 60_000) -> None:
        self.page.click("#start")
        self.page.wait_for_function(f"window.fm.stats.received >= {notes}", timeout=timeout_ms)

    def outside_requests(self) -> list[str]:
        bad = []
        for url in self.requests:
            parsed = urlparse(url)
            if parsed.scheme in ("data", "blob"):
                continue
            if parsed.hostname not in LOOPBACK and f"[{parsed.hostname}]" not in LOOPBACK:
                bad.append(url)
        return bad


@contextlib.contextmanager
def page_on(browser, base_url: str):
    """The page served by ``base_url`` in a fresh browser context; on exit, checks it stayed clean."""
    context = browser.new_context(viewport={"width": 1280, "height": 760}, accept_downloads=True)
    pg = context.new_page()
    under_test = PageUnderTest(pg, base_url)
    pg.goto(base_url + "/")
    wait_for_page(pg)
    yield under_test
    if under_test.page.evaluate("() => window.fm.session !== null"):
        pg.click("#start")  # Stop, so the server's session ends cleanly
        pg.wait_for_function("window.fm.session === null", timeout=10_000)
    context.close()
    assert not under_test.problems, under_test.problems
    assert not under_test.outside_requests(), under_test.outside_requests()


def wait_for_page(pg) -> None:
    pg.wait_for_function("window.fm !== undefined && typeof Midi === 'function'")


@pytest.fixture
def page(browser, live_server):
    with page_on(browser, live_server.http_url) as under_test:
        yield under_test


WALL_NOW = "(performance.timeOrigin + performance.now()) / 1000"  # the page's wallNow(), in unix seconds


def record_scheduling(pg) -> None:
    """Wraps the synth's ``schedule`` so the test sees, per server note, how far ahead of its start
    it arrived (negative: late) and whether it was scheduled or dropped as already over."""
    pg.evaluate(f"""() => {{
        const synth = window.fm.synth, schedule = synth.schedule.bind(synth);
        window.fmScheduled = [];
        synth.schedule = (note) => {{
            const lead = note.t - {WALL_NOW}, scheduled = schedule(note);
            window.fmScheduled.push({{lead, duration: note.d, scheduled}});
            return scheduled;
        }};
    }}""")


def canvas_ink(pg) -> int:
    """Pixels of the piano roll that are bright (notes, playhead, keys) rather than background."""
    return pg.evaluate("""() => {
        const c = document.getElementById('roll');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] + d[i + 1] + d[i + 2] > 200) n++;
        return n;
    }""")


def test_page_loads_offline_with_its_controls(page):
    pg = page.page
    assert pg.title() == "FM Server"
    for selector in ("#start", "#pause", "#bookmark", "#bookmarks", "#download", "#volume", "#mute", "#bpm", "#temperature", "#top_k",
                     "#top_p", "#seed", "#prompt-file", "#keys .key", "#roll"):
        assert pg.locator(selector).count() >= 1, selector
    assert pg.input_value("#ws-url") == page.base_url.replace("http://", "ws://") + "/ws"
    assert pg.inner_text("#status-text") == "not connected"
    assert page.requests, "the page made no requests at all"
    assert not page.outside_requests()


def test_stream_is_drawn_scheduled_and_shown(page, timing_report):
    pg = page.page
    idle_ink = canvas_ink(pg)
    record_scheduling(pg)
    page.start(notes=24)
    # the earliest notes reach the playhead, and the roll draws them
    pg.wait_for_function(f"window.fm.roll.notes.some(n => !n.played && n.t <= {WALL_NOW})", timeout=30_000)
    deadline = time.monotonic() + 30
    while canvas_ink(pg) <= idle_ink + 200:
        assert time.monotonic() < deadline, "the piano roll drew no notes"
        pg.wait_for_timeout(50)
    stats, scheduled = pg.evaluate("() => [window.fm.stats, window.fmScheduled]")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "web_page_stream.png"
    pg.screenshot(path=str(shot))
    print(f"screenshot: {shot}; stats: {stats}")

    received = sum(len(m["notes"]) for m in page.received if m["type"] == "notes")
    assert stats["received"] >= 24 and stats["received"] <= received
    # Every note that came went to the synth, and the ones that arrived in time (a tenth of a second
    # before their start: the audio clock runs a little behind the wall clock) were all scheduled.
    # Only a note that arrived after it was over may be dropped: a busy machine can make one late,
    # which the headroom figures show.
    assert len(scheduled) == stats["received"] and stats["scheduled"] == sum(s["scheduled"] for s in scheduled)
    assert stats["dropped"] == len(scheduled) - stats["scheduled"], stats
    on_time_dropped = [s for s in scheduled if s["lead"] > 0.1 and not s["scheduled"]]
    assert not on_time_dropped, f"notes that arrived in time were dropped: {on_time_dropped}"
    leads = [s["lead"] for s in scheduled]
    timing_report("web_page_headroom",
                  f"web page headroom over {len(leads)} notes: min {min(leads) * 1000:.0f} ms, "
                  f"p50 {statistics.median(leads) * 1000:.0f} ms, {sum(x < 0 for x in leads)} late, "
                  f"{stats['dropped']} dropped as over",
                  notes=len(leads), late=sum(x < 0 for x in leads), dropped=stats["dropped"],
                  headroom_s={"min": round(min(leads), 4), "p50": round(statistics.median(leads), 4),
                              "max": round(max(leads), 4)},
                  headroom_each_s=[round(x, 4) for x in leads])
    # The audio clock runs.
    t0 = pg.evaluate("() => window.fm.synth.ctx.currentTime")
    pg.wait_for_function("t0 => window.fm.synth.ctx.currentTime - t0 > 0.1", arg=t0, timeout=30_000)
    assert pg.evaluate("() => window.fm.synth.ctx.state") == "running"
    assert pg.inner_text("#status-text").startswith("playing")
    assert pg.inner_text("#stat-notes").endswith("notes") and pg.inner_text("#stat-notes") != "0 notes"
    assert "headroom" in pg.inner_text("#stat-headroom")
    session = next(m for m in page.received if m["type"] == "session")
    assert page.sent[0]["type"] == "start" and session["clock"] > 0


def test_changing_temperature_sends_set(page):
    pg = page.page
    page.start(notes=1)
    pg.fill("#temperature", "1.3")
    pg.wait_for_function("document.getElementById('temperature-out').textContent === '1.30'")
    deadline = time.monotonic() + 10
    while not any(m["type"] == "state" and m["temperature"] == pytest.approx(1.3) for m in page.received):
        assert time.monotonic() < deadline, f"no state with temperature 1.3; sent {page.sent_of('set')}"
        pg.wait_for_timeout(50)
    assert page.sent_of("set")[-1] == {"type": "set", "temperature": 1.3}


def test_accompany_toggle_leaves_the_melody_to_the_player(page):
    """"You play the melody, it plays the rest": checked before start, the start message asks the
    server to leave voice 0 (the voice played notes take) alone, and no note it sends is in that
    voice; unchecked while playing, a set turns it off and the state says so."""
    pg = page.page
    pg.check("#accompany")
    page.start(notes=24)
    assert page.sent_of("start")[0]["accompany"] == {"voices": [0]}
    generated = [n for m in page.received if m["type"] == "notes" for n in m["notes"]]
    assert len(generated) >= 24 and all(n["voice"] != 0 for n in generated), {n["voice"] for n in generated}
    pg.uncheck("#accompany")
    deadline = time.monotonic() + 10
    while not any(m["type"] == "state" and "accompany" in m and m["accompany"] is None for m in page.received):
        assert time.monotonic() < deadline, f"no state without accompany; sent {page.sent_of('set')}"
        pg.wait_for_timeout(50)
    assert page.sent_of("set")[-1] == {"type": "set", "accompany": {"voices": []}}
    assert not pg.is_checked("#accompany")


def test_typed_keys_sound_at_once_and_go_to_the_session(page):
    pg = page.page
    page.start(notes=1)
    clock = next(m for m in page.received if m["type"] == "session")["clock"]
    pg.wait_for_function(f"{WALL_NOW} > {clock} + 0.1")  # play after session time 0
    before_down = time.time()
    pg.keyboard.down("a")
    pg.wait_for_function("window.fm.stats.live === 1")  # the key sounds while it is held
    after_down = time.time()
    assert pg.locator('#keys .key[data-pitch="60"].pressed').count() == 1
    pg.wait_for_timeout(200)  # holding the key
    before_up = time.time()
    pg.keyboard.up("a")
    pg.keyboard.press("h")  # A4
    pg.wait_for_function("window.fm.stats.sent >= 2")
    after_up = time.time()
    played = [n for m in page.sent_of("notes") for n in m["notes"]]
    assert [n["pitch"] for n in played] == [60, 69]
    # The page stamps the key's press and release when it handles them, which happened between the
    # times around each (the page's clock, performance.timeOrigin + now(), and ours agree to a few ms).
    first, slack = played[0], 0.05
    assert before_down - clock - slack <= first["start"] <= after_down - clock + slack, (first, before_down - clock)
    assert before_up - after_down - slack <= first["duration"] <= after_up - before_down + slack, (
        first, before_up - after_down)
    assert pg.evaluate("() => window.fm.roll.notes.filter(n => n.played).length") == 2


def test_on_screen_keyboard_plays(page):
    pg = page.page
    page.start(notes=1)
    key = pg.locator('#keys .key[data-pitch="64"]')
    key.hover()
    pg.mouse.down()
    pg.wait_for_timeout(150)
    pg.mouse.up()
    pg.wait_for_function("window.fm.stats.sent >= 1")
    assert page.sent_of("notes")[-1]["notes"][0]["pitch"] == 64


def test_download_is_a_midi_file_of_the_session(page, tmp_path):
    pg = page.page
    page.start(notes=16)
    pg.keyboard.press("d")  # E4, played
    pg.wait_for_function("window.fm.stats.sent >= 1")
    # Ten of the notes that have arrived have sounded, and what has sounded spans over a second.
    pg.wait_for_function(f"""() => {{
        const now = {WALL_NOW};
        const sounded = window.fm.roll.notes.filter(n => n.played || n.t <= now);
        const span = Math.max(...sounded.map(n => n.t + (n.d || 0))) - Math.min(...sounded.map(n => n.t));
        return sounded.filter(n => !n.played).length >= 10 && span > 1;
    }}""", timeout=60_000)
    pg.click("#start")  # Stop: the session so far is now fixed
    pg.wait_for_function("window.fm.session === null")
    with pg.expect_download() as info:
        pg.click("#download")
    path = tmp_path / "session.mid"
    info.value.save_as(path)
    assert info.value.suggested_filename.endswith(".mid")
    midi = mido.MidiFile(path)
    pitches = {t.name: sorted(m.note for m in t if m.type == "note_on" and m.velocity > 0) for t in midi.tracks}
    assert pitches.pop("played") == [64]
    # The file holds the notes that had sounded when Stop was pressed (later ones were silenced).
    kept = pg.evaluate("() => window.fm.roll.notes.filter(n => !n.played).map(n => n.pitch).sort((a, b) => a - b)")
    assert sorted(p for track in pitches.values() for p in track) == kept
    received = [n["pitch"] for m in page.received if m["type"] == "notes" for n in m["notes"]]
    assert len(kept) >= 10 and all(kept.count(p) <= received.count(p) for p in set(kept))
    assert midi.length > 1


def test_midi_file_prompt_is_sent_with_start(page, tmp_path):
    pg = page.page
    prompt = tmp_path / "prompt.mid"
    prompt.write_bytes(build_midi([(b * 0.5, 0.5, 60 + (0, 4, 7, 12)[b % 4]) for b in range(16)]))
    pg.set_input_files("#prompt-file", str(prompt))
    pg.wait_for_function("document.getElementById('prompt-text').textContent.includes('16 notes')")
    page.start(notes=4)
    start = page.sent_of("start")[0]
    assert "prompt_midi" in start and "prompt_notes" not in start
    import base64

    assert mido.MidiFile(file=io.BytesIO(base64.b64decode(start["prompt_midi"]))).length > 0


def test_notes_played_before_start_become_the_prompt(page):
    pg = page.page
    for key in "asdf":
        pg.keyboard.press(key)
    pg.wait_for_function("document.getElementById('prompt-text').textContent.includes('4 played notes')")
    page.start(notes=1)
    start = page.sent_of("start")[0]
    assert [n["pitch"] for n in start["prompt_notes"]] == [60, 62, 64, 65]
    assert start["prompt_notes"][0]["start"] == 0


def test_pause_resume_and_stop(page):
    pg = page.page
    page.start(notes=1)
    pg.click("#pause")
    pg.wait_for_function("document.getElementById('status-text').textContent.startsWith('paused')")
    pg.click("#pause")
    pg.wait_for_function("document.getElementById('status-text').textContent.startsWith('playing')")
    pg.click("#start")  # now "Stop"
    pg.wait_for_function("window.fm.session === null")
    assert [m["type"] for m in page.sent][-3:] == ["pause", "resume", "stop"]
    assert any(m["type"] == "stopped" for m in page.received)
    assert pg.inner_text("#start").strip().endswith("Start")


def note_beats(frames: list[dict]) -> list[float]:
    return [n["beat"] for m in frames if m["type"] == "notes" for n in m["notes"]]


def test_a_dropped_connection_resumes_the_same_session_with_no_note_twice(page):
    """The resume start says the latest beat the page has (``last_beat``), and the server sends
    nothing at or before it again."""
    pg = page.page
    page.start(notes=4)
    first = next(m for m in page.received if m["type"] == "session")
    # Not a stop: the page comes back. `had`: the notes the page had taken in when the socket dropped.
    had = pg.evaluate("() => { const n = window.fm.stats.received; window.fm.session.ws.close(4000, 'test: drop');"
                      " return n; }")
    pg.wait_for_function("window.fm.stats.state === 'playing' && window.fm.session && window.fm.session.live "
                         "&& window.fm.session.attempt === 0", timeout=30_000)
    page.until(lambda: [m for m in page.received if m["type"] == "session" and m["resumed"]], "no resumed session")
    again = page.socket_where(lambda f: any(m["type"] == "session" and m["resumed"] for m in f["received"]))
    resumed = next(m for m in again["received"] if m["type"] == "session")
    assert resumed["clock"] == first["clock"] and resumed["id"] == first["id"]
    heard = note_beats(page.sockets[0]["received"])[:had]
    assert again["sent"][0] == {"type": "start", "resume_token": first["resume_token"], "last_beat": max(heard)}
    before = page.stats()["received"]
    pg.wait_for_function(f"window.fm.stats.received > {before}", timeout=30_000)
    assert note_beats(again["received"]) and min(note_beats(again["received"])) > max(heard)


def shown_beat(beat: float) -> str:
    """A beat as the bookmark list shows it (JavaScript's Math.round to a tenth, no trailing .0)."""
    return f"beat {math.floor(beat * 10 + 0.5) / 10:g}"


def test_a_bookmark_jumps_back_to_its_moment_in_a_new_session(page):
    pg = page.page
    assert pg.is_disabled("#bookmark") and pg.is_hidden("#marks")  # no bookmarks yet
    page.start(notes=8)
    first = next(m for m in page.received if m["type"] == "session")
    state = next(m for m in page.received if m["type"] == "state")
    pg.click("#bookmark")
    pg.wait_for_selector("#bookmarks .jump")
    mark = next(m for m in page.received if m["type"] == "snapshot")
    assert mark["beat"] > 0 and shown_beat(mark["beat"]) in pg.inner_text("#bookmarks .jump")
    played_on = page.stats()["received"] + 4  # the music goes on past the bookmark
    pg.wait_for_function(f"window.fm.stats.received >= {played_on}", timeout=30_000)
    pg.fill("#temperature", "1.2")  # the jump takes the page's settings now

    pg.click("#bookmarks .jump")
    pg.wait_for_function(f"window.fm.session && window.fm.session.id && window.fm.session.id !== '{first['id']}' "
                         "&& window.fm.stats.received >= 4", timeout=60_000)
    assert page.sockets[0]["sent"][-1] == {"type": "stop"}
    assert any(m["type"] == "stopped" for m in page.sockets[0]["received"])
    jump = page.socket_where(lambda f: f["sent"] and f["sent"][0].get("snapshot"))
    start = jump["sent"][0]
    assert start["snapshot"] == mark["id"] and not {"prompt_notes", "prompt_midi", "resume_token"} & set(start)
    assert start["temperature"] == 1.2 and start["seed"] == state["seed"]
    assert {k: start[k] for k in ("bpm", "top_k", "top_p", "key_pull")} == {
        k: state[k] for k in ("bpm", "top_k", "top_p", "key_pull")}
    session = next(m for m in jump["received"] if m["type"] == "session")
    assert session["snapshot"] == mark["id"] and not session["resumed"] and session["clock"] == first["clock"]
    assert min(note_beats(jump["received"])) > mark["beat"]  # it goes on after the bookmark
    status = pg.inner_text("#status-text")
    assert status.startswith("playing") and "from bookmark" in status
    assert shown_beat(mark["beat"]) in pg.inner_text("#bookmarks li.current")
    # the roll goes on: what the first session played is still on it
    assert pg.evaluate("() => window.fm.roll.notes.filter(n => !n.played).length") > page.stats()["received"]

    pg.click("#start")  # Stop; the list outlasts a reload
    pg.wait_for_function("window.fm.session === null")
    pg.reload()
    wait_for_page(pg)
    assert pg.locator("#bookmarks .jump").count() == 1 and shown_beat(mark["beat"]) in pg.inner_text("#bookmarks")


def test_a_bookmark_the_server_no_longer_has_is_refused_with_its_error(page):
    pg = page.page
    # kept in localStorage from before the server restarted (without --store it keeps bookmarks in memory)
    pg.evaluate("""() => localStorage.setItem("fm.bookmarks", JSON.stringify([{
        id: "gone-after-a-restart", beat: 12, at: Date.now() - 60000, expires: Date.now() + 3600000,
        server: "ws://127.0.0.1:9/ws"}]))""")
    pg.reload()
    wait_for_page(pg)
    assert shown_beat(12) in pg.inner_text("#bookmarks .jump")
    pg.click("#bookmarks .jump")
    pg.wait_for_function("window.fm.session === null && "
                         "document.getElementById('status-text').textContent.includes('unknown_snapshot')")
    assert page.sent_of("start") == [{**page.sent_of("start")[0], "snapshot": "gone-after-a-restart"}]
    assert [m["code"] for m in page.received if m["type"] == "error"] == ["unknown_snapshot"]
    assert not any(m["type"] == "session" for m in page.received)
    assert pg.inner_text("#start").strip().endswith("Start") and pg.is_disabled("#bookmark")


def test_a_bookmark_continued_on_another_checkpoint_says_so(browser, served_checkpoint, later_checkpoint):
    """Two replicas share a store (a rolling restart onto a new model): a bookmark made on the old
    one and played on the new one is re-read there, and the status line says so."""
    with redis_server() as store, \
            running_server(ServerConfig(checkpoint=str(served_checkpoint), store=store)) as old, \
            running_server(ServerConfig(checkpoint=str(later_checkpoint), store=store,
                                        allowed_origins=old.http_url)) as new, \
            page_on(browser, old.http_url) as page:
        pg = page.page
        page.start(notes=4)
        pg.click("#bookmark")
        pg.wait_for_selector("#bookmarks .jump")
        assert "continued on a new model" not in pg.inner_text("#status-text")
        pg.click("details.server summary")  # the server address, behind ⚙
        pg.fill("#ws-url", new.ws_url)
        pg.click("#bookmarks .jump")
        pg.wait_for_function("window.fm.stats.received >= 4 && "
                             "document.getElementById('status-text').textContent.includes('continued on a new model')",
                             timeout=60_000)
        jump = page.socket_where(lambda f: f["sent"] and f["sent"][0].get("snapshot"))
        assert jump["url"] == new.ws_url and page.sockets[0]["url"] == old.ws_url
        session = next(m for m in jump["received"] if m["type"] == "session")
        assert session["reread"] and not session["resumed"]

"""Every setting of the server, in one dataclass (flags and ``FM_*`` environment twins come from it)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from model.midi.limits import ReadLimits
from server.store import check_store_url

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")

DEFAULT_CHECKPOINT = str(Path(__file__).resolve().parent.parent / "checkpoints" / "default")


@dataclass(frozen=True)
class ServerConfig:
    checkpoint: str = field(default=DEFAULT_CHECKPOINT, metadata={
        "help": "checkpoint directory to serve (default: the shipped one)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0 for every interface)"})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    device: str = field(default="auto", metadata={
        "help": "where the model runs: auto (cuda when there is one), cpu or cuda", "choices": ("auto", "cpu", "cuda")})
    dtype: str = field(default="auto", metadata={
        "help": "weights' precision: auto (bf16 on CUDA and AVX-512 CPUs, else fp32), bf16 or fp32",
        "choices": ("auto", "bf16", "fp32")})
    max_sessions: int = field(default=1024, metadata={
        "help": "live plus resumable sessions at most; more are refused with close code 1013"})
    max_batch: int = field(default=4096, metadata={"help": "streams advanced in one model step at most"})
    lookahead: float = field(default=0.5, metadata={
        "help": "seconds of music sent ahead of time (notes leave the server at most this early)"})
    generate_ahead: float = field(default=0.5, metadata={
        "help": "seconds of music generated beyond the lookahead and held on the server, to absorb slow steps"})
    answer_after_generated: bool = field(default=False, metadata={
        "help": "read played notes after all the music already generated (the behaviour before answers went back "
                "to the latest sent note; for comparison): answers come up to lookahead plus generate-ahead later"})
    recent_states: int = field(default=32, metadata={
        "help": "per live session, the states after its latest reads kept for answers (each: the field, position "
                "and hidden state, about 18 KB with the shipped model): going back to the latest sent note is then "
                "a copy; 0 reads the tokens since the rollback checkpoint again (slower answers, less memory)"})
    threads: int = field(default=0, metadata={
        "help": "CPU threads for the model on CPU; 0: one fewer than the CPU cores (at least 1), "
                "leaving a core to the network side"})
    resume_seconds: float = field(default=60.0, metadata={
        "help": "how long a dropped session waits for its resume token"})
    store: str = field(default="", metadata={
        "help": "session store shared by replicas, redis://HOST:PORT/DB: sessions are saved there every "
                "--snapshot-seconds, when a connection drops and at shutdown, and a resume token works on any "
                "replica that shares it; bookmarks are kept there too. Empty: sessions live in this process only"})
    snapshot_seconds: float = field(default=5.0, metadata={
        "help": "with --store: how often each live session is saved (a replica killed without warning loses at "
                "most this much of a stream, which its new replica generates again and does not send twice)"})
    bookmark_seconds: float = field(default=7 * 86_400.0, metadata={
        "help": "how long a bookmark ({\"type\":\"snapshot\"}) is kept"})
    max_bookmarks_per_session: int = field(default=100, metadata={
        "help": "bookmarks and forks one session may make (without --store the server keeps at most 10,000 "
                "bookmarks in memory, dropping the oldest)"})
    max_frame_bytes: int = field(default=1 << 20, metadata={
        "help": "largest WebSocket frame accepted (bigger ones close with code 1009)"})
    max_upload_bytes: int = field(default=1 << 20, metadata={"help": "largest .mid prompt accepted"})
    prompt_max_tracks: int = field(default=256, metadata={"help": "most track chunks a .mid prompt may hold"})
    prompt_max_events: int = field(default=500_000, metadata={"help": "most MIDI events a .mid prompt may hold"})
    prompt_max_notes: int = field(default=65_536, metadata={"help": "most notes a prompt may hold"})
    prompt_max_beats: float = field(default=20_000.0, metadata={
        "help": "longest prompt in beats, from its start to its last event (every bar is a token)"})
    prompt_max_tokens: int = field(default=65_536, metadata={"help": "most tokens a prompt may become"})
    prompt_seconds: float = field(default=10.0, metadata={
        "help": "longest time reading and tokenizing one prompt may take"})
    prompt_workers: int = field(default=1, metadata={
        "help": "processes that read .mid prompts (apart from the server, so a prompt holds up no session)"})
    api_key: str = field(default="", metadata={
        "help": "key every client must send (header 'Authorization: Bearer KEY' or 'X-API-Key', or "
                "'?api_key=KEY' on the WebSocket URL); empty: no key"})
    insecure_no_auth: bool = field(default=False, metadata={
        "help": "serve without --api-key although clients reach the server from other machines"})
    exposed_host: str = field(default="", metadata={
        "help": "the address clients reach the server on, when it is not --host (e.g. the address Docker "
                "publishes the port on); decides whether --api-key is required. Empty: --host"})
    allowed_hosts: str = field(default="", metadata={
        "help": "comma-separated Host header names accepted ('*': any); empty: localhost, 127.0.0.1 and ::1 "
                "without --api-key (against DNS rebinding), any with one"})
    allowed_origins: str = field(default="", metadata={
        "help": "comma-separated browser origins (e.g. https://app.example) that may open sessions and "
                "POST /generate besides the server's own page ('*': any); requests without Origin are "
                "not browsers and pass"})
    max_sessions_per_client: int = field(default=256, metadata={
        "help": "live plus resumable sessions one client address may hold"})
    max_jobs_per_client: int = field(default=4, metadata={
        "help": "POST /generate requests one client address may have running"})
    max_messages_per_second: float = field(default=50.0, metadata={
        "help": "messages a WebSocket may send per second on average (bursts of twice that); more are "
                "answered with one rate_limited error and dropped"})
    send_timeout: float = field(default=10.0, metadata={
        "help": "seconds a frame may wait for a client that stops reading before the connection is "
                "closed (1008) and the session waits for its resume token"})
    log_level: str = field(default="info", metadata={
        "help": "logging level", "choices": ("debug", "info", "warning", "error")})

    def __post_init__(self) -> None:
        if not 0 < self.lookahead <= 30:
            raise ValueError("lookahead must lie in (0, 30] seconds")
        if not 0 <= self.generate_ahead <= 60:
            raise ValueError("generate_ahead must lie in [0, 60] seconds")
        if self.threads < 0:
            raise ValueError("threads must be 0 (automatic) or more")
        if self.recent_states < 0:
            raise ValueError("recent_states must be 0 (read the log again) or more")
        if self.max_sessions < 1 or self.max_batch < 1:
            raise ValueError("max_sessions and max_batch must be at least 1")
        if not 1 <= self.port <= 65535 and self.port != 0:
            raise ValueError("port must lie in 1-65535 (0 picks a free one)")
        _ = self.read_limits  # builds ReadLimits, which checks every prompt limit
        if self.prompt_workers < 1 or self.max_sessions_per_client < 1 or self.max_jobs_per_client < 1:
            raise ValueError("prompt_workers, max_sessions_per_client and max_jobs_per_client must be at least 1")
        check_store_url(self.store)
        if not 0.1 <= self.snapshot_seconds <= 3600 or not self.bookmark_seconds > 0:
            raise ValueError("snapshot_seconds must lie in [0.1, 3600] and bookmark_seconds be > 0")
        if self.max_bookmarks_per_session < 0:
            raise ValueError("max_bookmarks_per_session must be 0 or more")
        if not self.max_messages_per_second > 0 or not self.send_timeout > 0:
            raise ValueError("max_messages_per_second and send_timeout must be > 0")
        if not self.api_key and not self.insecure_no_auth and not is_loopback(self.exposed_host or self.host):
            raise ValueError(f"the server would be reachable from other machines ({self.exposed_host or self.host}) "
                             "without an API key: give --api-key KEY (FM_API_KEY), bind --host 127.0.0.1, or "
                             "accept the risk with --insecure-no-auth")

    @property
    def read_limits(self) -> ReadLimits:
        """The limits one prompt is read under."""
        return ReadLimits(max_tracks=self.prompt_max_tracks, max_events=self.prompt_max_events,
                          max_notes=self.prompt_max_notes, max_beats=self.prompt_max_beats,
                          max_tokens=self.prompt_max_tokens, seconds=self.prompt_seconds)

    @property
    def host_names(self) -> frozenset[str] | None:
        """Host header names accepted (lower case, no port); None: any."""
        names = [n.strip().lower() for n in self.allowed_hosts.split(",") if n.strip()]
        if "*" in names or (not names and self.api_key):
            return None
        return frozenset(names or LOOPBACK_NAMES)

    @property
    def origins(self) -> frozenset[str] | None:
        """Browser origins accepted besides the server's own page; None: any."""
        names = [n.strip().lower().rstrip("/") for n in self.allowed_origins.split(",") if n.strip()]
        return None if "*" in names else frozenset(names)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is reachable from this machine only."""
    if host.lower() in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False

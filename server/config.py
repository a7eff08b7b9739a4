"""Every setting of the server, in one dataclass (flags and ``FM_*`` environment twins come from it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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
    threads: int = field(default=0, metadata={
        "help": "CPU threads for the model on CPU; 0: one fewer than the CPU cores (at least 1), "
                "leaving a core to the network side"})
    resume_seconds: float = field(default=60.0, metadata={
        "help": "how long a dropped session waits for its resume token"})
    max_frame_bytes: int = field(default=1 << 20, metadata={
        "help": "largest WebSocket frame accepted (bigger ones close with code 1009)"})
    max_upload_bytes: int = field(default=1 << 20, metadata={"help": "largest .mid prompt accepted"})
    log_level: str = field(default="info", metadata={
        "help": "logging level", "choices": ("debug", "info", "warning", "error")})

    def __post_init__(self) -> None:
        if not 0 < self.lookahead <= 30:
            raise ValueError("lookahead must lie in (0, 30] seconds")
        if not 0 <= self.generate_ahead <= 60:
            raise ValueError("generate_ahead must lie in [0, 60] seconds")
        if self.threads < 0:
            raise ValueError("threads must be 0 (automatic) or more")
        if self.max_sessions < 1 or self.max_batch < 1:
            raise ValueError("max_sessions and max_batch must be at least 1")
        if not 1 <= self.port <= 65535 and self.port != 0:
            raise ValueError("port must lie in 1-65535 (0 picks a free one)")

"""The checkpoint the server serves, loaded once, on its device and in its precision."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from model.checkpoint.format import checkpoint_digest, load_model
from model.runtime.device import resolve_device, resolve_precision
from server.config import ServerConfig


class ServedModel:
    """The checkpoint the server loaded, on its device and in its precision."""

    def __init__(self, config: ServerConfig) -> None:
        self.device = resolve_device(config.device)
        if self.device.type == "cpu":
            # The engine thread's model step and the event loop (WebSockets) share the CPU; on 2
            # cores a 1-thread model under 128 sessions had 266 late notes where 2 threads had 1,043.
            torch.set_num_threads(config.threads or max(1, (os.cpu_count() or 2) - 1))
        self.threads = torch.get_num_threads()
        self.dtype = resolve_precision(config.dtype, self.device)
        self.path = Path(config.checkpoint)
        model, self.tokenizer, self.checkpoint = load_model(self.path, device=self.device)
        self.digest = checkpoint_digest(self.checkpoint.path)  # named by the snapshots of its sessions
        self.model = model.to(self.dtype) if self.dtype != torch.float32 else model
        self.parameters = sum(p.numel() for p in self.model.parameters())

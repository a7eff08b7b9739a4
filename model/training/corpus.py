"""A folder of MIDI files as tokenizer events, cached, with a report of every file.

:func:`load_corpus` reads every MIDI file under a folder, recovers broken ones where it can, and
keeps the reason for every file it skips. Events are cached per file under ``cache_dir`` keyed by
the file's content and the tokenizer settings, so a second read parses no MIDI at all.
``python -m model.corpus`` prints the summary (:func:`corpus_report`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from model.midi.read import find_midi_files, read_midi
from model.midi.score import MidiReadError
from model.tokenizer.sequences import Events, TokenSequence
from model.tokenizer.tokenizer import Tokenizer
from model.tokenizer.vocabulary import TOKENIZER_FORMAT, TokenizerConfig, TokenizerError

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$FM_CACHE_DIR``, else ``$XDG_CACHE_HOME/fm-server``, else ``~/.cache/fm-server``."""
    if os.environ.get("FM_CACHE_DIR"):
        return Path(os.environ["FM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fm-server"


@dataclass
class CorpusFile:
    path: str
    events: Events
    recovered: bool
    problems: list[str]


@dataclass
class Corpus:
    """Every file of a folder: the ones read (with their events) and the ones skipped."""

    root: str
    files: list[CorpusFile] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    cache_hits: int = 0

    @property
    def recovered(self) -> list[CorpusFile]:
        return [f for f in self.files if f.recovered]

    @property
    def notes(self) -> int:
        return sum(f.events.note_count for f in self.files)

    @property
    def events(self) -> int:
        return sum(len(f.events) for f in self.files)

    def split(self, val_fraction: float) -> tuple[list[CorpusFile], list[CorpusFile]]:
        """Deterministic (train, validation) split by file: a hash of the relative path decides."""
        if not 0 <= val_fraction < 1:
            raise ValueError("val_fraction must lie in [0, 1)")
        ranked = sorted(self.files, key=lambda f: hashlib.sha256(f.path.encode()).hexdigest())
        n_val = round(len(ranked) * val_fraction)
        if val_fraction > 0 and len(ranked) > 1:
            n_val = min(max(n_val, 1), len(ranked) - 1)
        val = {f.path for f in ranked[:n_val]}
        return ([f for f in self.files if f.path not in val], [f for f in self.files if f.path in val])


def config_digest(config: TokenizerConfig) -> str:
    text = json.dumps({"format": TOKENIZER_FORMAT, "config": asdict(config)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class EventCache:
    """Events per file content under ``<dir>/<settings digest>/<content sha256>.npz`` (no pickle).

    A file that could not be read is cached as ``<sha>.json`` with its reason, so it is reported
    again without being parsed again.
    """

    def __init__(self, cache_dir: str | Path, config: TokenizerConfig) -> None:
        self.dir = Path(cache_dir) / config_digest(config)

    def get(self, digest: str) -> tuple[Events, bool, list[str]] | str | None:
        npz, err = self.dir / f"{digest}.npz", self.dir / f"{digest}.json"
        if npz.exists():
            try:
                with np.load(npz, allow_pickle=False) as data:
                    meta = json.loads(str(data["meta"]))
                    arrays = {k: data[k] for k in ("kind", "a", "b", "c", "velocity", "voice")}
            except (OSError, ValueError, KeyError) as exc:
                logger.warning("ignoring unreadable cache entry %s: %s", npz, exc)
                return None
            return Events(**arrays, problems=meta["problems"]), meta["recovered"], meta["problems"]
        if err.exists():
            return json.loads(err.read_text())["reason"]
        return None

    def put(self, digest: str, value: tuple[Events, bool, list[str]] | str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if isinstance(value, str):
            _atomic_write(self.dir / f"{digest}.json", json.dumps({"reason": value}).encode())
            return
        events, recovered, problems = value
        meta = json.dumps({"recovered": recovered, "problems": problems})
        tmp = self.dir / f".{digest}.{_writer()}.npz"
        np.savez(tmp, meta=np.array(meta), **events.arrays())
        os.replace(tmp, self.dir / f"{digest}.npz")


def _writer() -> str:
    """Who writes a temporary file: host and process, so that the processes of a training run on
    several machines can share one cache folder without writing the same temporary file."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{_writer()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def file_events(data: bytes, name: str, tokenizer: Tokenizer) -> tuple[Events, bool, list[str]]:
    """Read one MIDI file's bytes into events. Raises MidiReadError / TokenizerError with a reason."""
    score = read_midi(data, name=name)
    events = tokenizer.events(score)
    return events, score.recovered, score.problems + events.problems


def load_corpus(midi_dir: str | Path, config: TokenizerConfig | None = None, *,
                cache_dir: str | Path | None = None, use_cache: bool = True,
                progress: bool = True) -> Corpus:
    """Read (or fetch from the cache) the events of every MIDI file under ``midi_dir``."""
    config = config or TokenizerConfig()
    tokenizer = Tokenizer(config)
    cache = EventCache(cache_dir or default_cache_dir(), config)
    root = Path(midi_dir)
    corpus = Corpus(root=str(root))
    paths = find_midi_files(root)
    for path in tqdm(paths, desc="reading MIDI", unit="file",
                     dynamic_ncols=True, leave=False, disable=None if progress else True):
        rel = str(path.relative_to(root))
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        entry = cache.get(digest) if use_cache else None
        if entry is not None:
            corpus.cache_hits += 1
        else:
            try:
                entry = file_events(data, rel, tokenizer)
            except (MidiReadError, TokenizerError) as exc:
                entry = str(exc)
            cache.put(digest, entry)
        if isinstance(entry, str):
            reason = entry.split(": ", 1)[1] if entry.startswith(f"{rel}: ") else entry
            corpus.skipped.append((rel, reason))
        else:
            events, recovered, problems = entry
            corpus.files.append(CorpusFile(rel, events, recovered, problems))
    return corpus


def encode_corpus(files: list[CorpusFile], tokenizer: Tokenizer) -> list[TokenSequence]:
    return [tokenizer.encode_events(f.events) for f in files]


def corpus_report(corpus: Corpus, tokenizer: Tokenizer, sequences: list[TokenSequence],
                  seconds: float) -> str:
    total = len(corpus.files) + len(corpus.skipped)
    tokens = sum(len(s) for s in sequences)
    lines = [
        f"folder          {corpus.root}",
        f"files           {total} found, {len(corpus.files)} read "
        f"({len(corpus.files) - len(corpus.recovered)} strictly, {len(corpus.recovered)} recovered), "
        f"{len(corpus.skipped)} skipped",
        f"notes           {corpus.notes}",
        f"tokens          {tokens} (with BOS/EOS; {tokens / max(corpus.notes, 1):.2f} per note)",
        f"vocabulary      {tokenizer.vocab_size} tokens",
        f"cache           {corpus.cache_hits} of {total} files from the cache",
        f"time            {seconds:.2f} s",
    ]
    if corpus.recovered:
        lines.append("recovered files:")
        for f in corpus.recovered:
            lines.append(f"  {f.path}: {f.events.note_count} notes; " + "; ".join(f.problems))
    if corpus.skipped:
        lines.append("skipped files:")
        lines.extend(f"  {path}: {reason}" for path, reason in corpus.skipped)
    return "\n".join(lines)

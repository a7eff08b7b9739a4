"""Start FM Server: ``python -m server [--checkpoint DIR] [--host H] [--port P] ...``.

Every flag has an environment twin: ``--max-sessions`` is ``FM_MAX_SESSIONS``, ``--checkpoint`` is
``FM_CHECKPOINT``, and so on (a flag on the command line wins).
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys

import uvicorn

from model.checkpoint.files import CheckpointError
from model.runtime.flags import add_dataclass_arguments, dataclass_from_args
from server.config import ServerConfig


def parse_config(argv: list[str] | None = None) -> ServerConfig:
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataclass_arguments(parser, ServerConfig, dashes=True, env_prefix="FM_")
    args = parser.parse_args(argv)
    try:
        return dataclass_from_args(ServerConfig, args)
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from server.app import create_app  # after logging is set up

    try:
        app = create_app(config)
    except (CheckpointError, FileNotFoundError) as exc:
        print(f"error: cannot load the checkpoint: {exc}\n"
              "Pass --checkpoint DIR (or FM_CHECKPOINT) with a folder written by python -m model.train.",
              file=sys.stderr)
        return 2
    except SystemExit:
        raise
    # The model, tokenizer and vocabulary live as long as the process: keep them out of the
    # garbage collector's full passes, which would otherwise walk them while sessions stream.
    gc.collect()
    gc.freeze()
    uvicorn.run(app, host=config.host, port=config.port, ws_max_size=config.max_frame_bytes,
                log_level=config.log_level, timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())

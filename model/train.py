"""Train a Field Machine on a folder of MIDI files: ``python -m model.train --midi_dir DIR``.

Files are split deterministically into training and validation sets (``--val_fraction``); the
tokenizer's vocabulary and the unigram/bigram baselines are fitted on the training files only.
Checkpoints go to ``--out_dir`` (see :mod:`model.training.run_folder`): ``latest`` (resume
target), ``best`` (lowest validation loss), one per epoch, and timed ones every ``--save_minutes``.
Training resumes from ``latest`` unless ``--fresh``. Ctrl-C saves ``latest`` and exits.

On several GPUs or machines, start it with torchrun (``torchrun --standalone --nproc_per_node N -m
model.train ...``): one process per device shares each step's ``--batch_size`` windows, and rank
0 writes the checkpoints (:mod:`model.training.distributed`).
"""

from __future__ import annotations

import argparse
import logging
import sys

from model.checkpoint.files import CheckpointError
from model.fm.config import ModelConfig
from model.runtime.flags import add_dataclass_arguments, dataclass_from_args
from model.training.distributed import install_stop_handlers, process_group, ranks_from_environment
from model.training.trainer import MODEL_FLAGS_FROM_DATA, TrainConfig, Trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataclass_arguments(parser, TrainConfig)
    add_dataclass_arguments(parser, ModelConfig, exclude=MODEL_FLAGS_FROM_DATA)
    args = parser.parse_args(argv)
    cfg = dataclass_from_args(TrainConfig, args)
    ranks = ranks_from_environment(cfg.device)
    # Under torchrun the other ranks log errors only: rank 0 speaks for the run.
    logging.basicConfig(level=logging.INFO if ranks.is_main else logging.ERROR,
                        format="%(asctime)s %(levelname)s " + (f"[rank {ranks.rank}] " if ranks.distributed else "")
                        + "%(message)s")
    model_flags = {name: getattr(args, name) for name in ModelConfig.__dataclass_fields__
                   if name not in MODEL_FLAGS_FROM_DATA}
    with process_group(ranks):
        try:
            trainer = Trainer(cfg, model_flags, ranks)
        except (CheckpointError, FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        install_stop_handlers(ranks)  # Ctrl-C and kill: save and exit
        stats = trainer.run()
    if ranks.is_main:
        print(f"done: {stats['steps']} steps, {stats['epochs']} epochs, validation loss "
              f"{stats['val_loss']}, best {stats['best_val_loss']}, {stats['tokens_per_s']} tokens/s; "
              f"checkpoints in {cfg.out_dir}")
    return 130 if stats["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())

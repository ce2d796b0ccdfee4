"""``python -m consistency_solver.training``: the trainer's command line (``training/trainer/cli.py``)."""

from .trainer.cli import main

if __name__ == "__main__":
    main()

"""The experiment layer behind ``experiments/run.py``: prompt building, the run loop, output files, wandb."""

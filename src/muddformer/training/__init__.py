"""Training runs: TrainConfig (config.py), recipes and parameter groups (recipes.py), the schedule,
the trainer's components (trainer.py), metrics, checkpoints and data parallelism."""

"""Training: volume library, on-the-fly simulation, curriculum configs and the trainer."""

"""What every part of the engine runs on: errors and exit codes, progress, YAML settings, and the
distributed environment with its communicator (one process or a torchrun group)."""

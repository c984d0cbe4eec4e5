"""Command-line shells around the engine: argument parsing only."""

"""Cryo-EM physics as pure, batched tensor functions (CPU or GPU; no file I/O)."""

"""Pose refinement against the data's own half maps: the driver over its passes (driver.py), their settings
(config.py), the state they share (state.py), the passes themselves (passes.py: starting maps, global
passes, local iterations; scan.py: one matching pass over the data; origin.py: the origin move and the
final maps), the global pass's grid search (global_pass.py), integer search balls (grids.py), the
CTF-aware matched filter that scores a particle at a pose (matching.py), and the registration that keeps
the two half sets in one frame (map_registration.py)."""

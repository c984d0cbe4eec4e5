"""Pose refinement against the data's own half maps: the driver over its passes (driver.py), the global
pass over a rotation grid (global_pass.py), local passes on integer balls (grids.py), the CTF-aware
matched filter that scores a particle at a pose (matching.py), and the registration that keeps the two
half sets in one frame (map_registration.py)."""

"""How good a result is: metrics against a known truth (metrics.py, against_truth.py), the pose-quality
verdict a run gives itself from its own data (verdict.py), and the pictures a person looks at (plots.py)."""

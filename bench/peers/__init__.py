"""One module per method the benchmark runs (ours and the peers); shared plumbing in ``common``."""

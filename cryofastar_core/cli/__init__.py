"""Command-line shells around the engine: argument parsing only."""

from cryofastar_core.runtime.threads import prefer_passive_wait

# Before torch starts its OpenMP runtime: idle threads then sleep instead of spinning on shared cores
# (cryofastar_core/runtime/threads.py; bench/oversubscription.py).
prefer_passive_wait()

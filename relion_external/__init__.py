"""RELION External-job adapter for CryoFastAR: ``cryofastar-relion`` (see README.md in this folder).

Modules: :mod:`~relion_external.protocol` (RELION's argv), :mod:`~relion_external.nodes` (version
detection, ``RELION_OUTPUT_NODES.star``), :mod:`~relion_external.markers` (exit and abort markers),
:mod:`~relion_external.main` (the program).
"""

from cryofastar_core.runtime.threads import prefer_passive_wait

# Before torch starts its OpenMP runtime: idle threads then sleep instead of spinning on shared cores
# (cryofastar_core/runtime/threads.py; bench/oversubscription.py).
prefer_passive_wait()

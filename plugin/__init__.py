"""CryoSPARC connector for CryoFastAR (``cryofastar-cryosparc``); see ``plugin/README.md``.

From a CryoSPARC Jupyter notebook::

    from cryosparc.tools import CryoSPARC
    import plugin
    cs = CryoSPARC("http://cryosparc.example.org:39000", email=..., password=...)
    result = plugin.run_in_cryosparc(cs, project="P3", workspace="W1", particles="J42.particles",
                                     device="cuda", views=128)
    print(result.external_job)
"""

from cryofastar_core.runtime.threads import prefer_passive_wait

# Before torch starts its OpenMP runtime: idle threads then sleep instead of spinning on shared cores
# (cryofastar_core/runtime/threads.py; bench/oversubscription.py).
prefer_passive_wait()
from plugin.connector import ConnectorConfig, ConnectorResult, run_connector, run_in_cryosparc
from plugin.credentials import Credentials, load_credentials
from plugin.offline import run_offline
from plugin.server import CryoSPARCServer, ServerError, check_tools_version

__all__ = ["run_in_cryosparc", "run_connector", "run_offline", "ConnectorConfig", "ConnectorResult",
           "CryoSPARCServer", "ServerError", "check_tools_version", "Credentials", "load_credentials"]

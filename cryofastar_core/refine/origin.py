"""The end of refinement: the frame's origin moved to the maps' centre of mass (:func:`move_origin`, see
"One origin" in :mod:`cryofastar_core.refine.driver`), and the final maps (:func:`final_maps`), rebuilt
from the returned poses wherever the current ones are not their reconstruction."""
from __future__ import annotations

import logging

from torch import Tensor

from cryofastar_core.reconstruct.centring import centring_offset
from cryofastar_core.refine.map_registration import shifts_after_moving_map
from cryofastar_core.refine.state import RefineState

log = logging.getLogger(__name__)


def move_origin(st: RefineState) -> None:
    """Move every shift so that the summed half maps' centre of mass
    (:func:`~cryofastar_core.reconstruct.centring.centring_offset`) sits at the box centre; the offset
    goes into the last history entry (``origin_moved_px``). The maps are rebuilt from the moved shifts
    by :func:`final_maps` rather than moved themselves, so they stay exactly the reconstruction of the
    poses returned."""
    t = centring_offset(st.maps[0] + st.maps[1])
    st.s = shifts_after_moving_map(st.R, st.s, t.cpu())
    st.history[-1]["origin_moved_px"] = float(t.norm())
    log.info("refined map's centre of mass moved to the box centre (%.2f px)", float(t.norm()))
    st.bps = None


def final_maps(st: RefineState) -> Tensor:
    """The full map ``(D, D, D)`` of the current poses; ``st.maps`` become their half maps. One more pass
    over the data only where no pass has reconstructed the current poses (no iteration ran and the caller
    gave the maps, or the origin moved). ``st.freq``, ``st.curve`` are left as they are: nothing reads
    them after this."""
    if st.bps is None:
        bps = st.new_backprojectors()
        st.on_every_rank(st.insert_all, bps)
        st.end_pass(bps, None)
        st.maps, st.bps = [bp.finalize() for bp in bps], bps
    return st.bps[0].add_(st.bps[1]).finalize()

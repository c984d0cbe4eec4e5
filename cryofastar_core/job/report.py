"""What a run did (``report.json``), and the sentence that says how far its feed-forward poses can be trusted."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from cryofastar_core.commonlines.config import COMMON_LINES


REPORT = "report.json"


@dataclass
class Report:
    """What a run did; written as ``report.json``."""

    version: str
    settings: dict
    weights: dict
    n_particles: int
    n_kept: int
    reference: int
    flipped_chunks: int
    n_chunks: int
    apix: float
    box: int
    model_box: int
    resolution_0143: float | None  # None when the pose quality failed: no number is claimed as a resolution
    timings_s: dict[str, float] = field(default_factory=dict)
    refinement: list[dict] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    resumed_from_poses: bool = False
    status: str = "complete"
    processes: int = 1  # ranks of a distributed (torchrun) run
    pose_warning: str = ""  # what the weights' held-out accuracy says of these poses (pose_trust_note)
    quality: dict = field(default_factory=dict)  # the data-only verdict (cryofastar_core.evaluation.verdict.PoseQuality)
    junk: dict = field(default_factory=dict)  # particles without evidence for any pose (refine/junk.py)
    work_scale: dict = field(default_factory=dict)  # the boxes and subset refinement worked at (job/work_scale.py)
    # Per stage, the process's peak resident memory so far (MB; a stage's own peak is the first rise to it),
    # and on a GPU the peak allocated by torch during the stage.
    peak_memory_mb: dict = field(default_factory=dict)
    # The class-average route (job/class_route.py): the averages' STAR, how many were posed and by what.
    class_averages: dict = field(default_factory=dict)
    # Several classes (job/classes.py): per class its number, particles, resolution, verdict, files, and
    # whether it is a sink (too few particles to be a conformation of its own).
    classes: list[dict] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, default=str)

    @property
    def resolution_text(self) -> str:
        """How a log may quote this run's resolution: the number, or why none is given."""
        if self.resolution_0143 is None:
            return "no resolution given: the poses failed the quality check (report.json: quality)"
        doubt = " (poses doubtful: see quality)" if self.quality.get("verdict") == "doubtful" else ""
        return f"gold-standard resolution {self.resolution_0143:.2f} Å (half-map FSC 0.143){doubt}"

    @property
    def verdict_lines(self) -> list[str]:
        """The pose-quality verdict and its main reason: the last lines every front end prints."""
        if not self.quality:
            return []
        return [f"POSE QUALITY: {self.quality['verdict'].upper()}: {self.quality['reasons'][0]}"]


def pose_trust_note(provenance: dict, refined: bool = False) -> str:
    """One plain sentence on how far these weights' feed-forward poses can be trusted, from the
    held-out accuracy recorded in the weights file (``extra["heldout"]``, written when weights ship), and
    what to do about it: refine (``refined`` False), or read the verdict on the refined poses."""
    heldout = provenance.get("heldout") if isinstance(provenance, dict) else None
    classical = isinstance(provenance, dict) and provenance.get("method") == COMMON_LINES
    then = ("this run refined them (global passes, then local iterations): the pose-quality verdict below says "
            "what the refined poses are worth." if refined else
            "the half-map resolution measures consistency, not correctness. Rerun with --refine-iters 3, or "
            "refine globally in RELION or CryoSPARC from this map, before building on it.")
    if classical:
        return ("FEED-FORWARD POSES FROM CLASSICAL COMMON LINES: within a few degrees on clean class averages and "
                "on images at SNR 1 or better (model card), but only as good as the 2D classes (averages that mix "
                f"views give chance) and near chance on raw particles at SNR 0.1; {then}")
    if not isinstance(heldout, dict) or "median_rot_deg" not in heldout:
        return f"FEED-FORWARD POSES NOT VALIDATED: these weights carry no held-out accuracy; {then}"
    return (f"FEED-FORWARD POSES NOT YET RELIABLE: on unseen simulated structures these weights' median rotation "
            f"error is {float(heldout['median_rot_deg']):.0f} deg ({heldout.get('setting', 'see the model card')}); "
            f"{then}")


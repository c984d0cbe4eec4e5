"""Particle and map I/O: RELION STAR (3.0, 3.1+), CryoSPARC ``.cs``, MRC stacks and maps.

Everything downstream works on :class:`ParticleSet`; poses are converted to the internal convention
of :mod:`cryofastar_core.geometry` here and nowhere else. Every writer is atomic.
"""
from cryofastar_core.io.atomic_write import atomic_output
from cryofastar_core.io.cs import write_particles_cs
from cryofastar_core.io.mrc import read_map, write_map, write_stack
from cryofastar_core.io.particles import CTF_FIELDS, ParticleSet, read_particles
from cryofastar_core.io.relion_tables import CONFIDENCE_LABEL
from cryofastar_core.io.star import new_star, write_particles_star

__all__ = ["ParticleSet", "read_particles", "write_particles_star", "write_particles_cs", "new_star", "write_stack",
           "read_map", "write_map", "atomic_output", "CONFIDENCE_LABEL", "CTF_FIELDS"]

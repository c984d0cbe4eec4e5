"""Reconstruction from posed particles: back-projection, half maps, FSC, masks."""
from .backproject import Backprojector, ParticleChunk, random_half_sets, reconstruct, reconstruct_half_maps
from .fsc import fsc, resolution_at
from .mask import soft_circle_mask, soft_sphere_mask

__all__ = ["Backprojector", "ParticleChunk", "random_half_sets", "reconstruct", "reconstruct_half_maps", "fsc",
           "resolution_at", "soft_circle_mask", "soft_sphere_mask"]

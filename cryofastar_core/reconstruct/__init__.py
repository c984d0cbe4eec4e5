"""Reconstruction from posed particles: back-projection, half maps, FSC, masks."""
from .backproject import Backprojector, ParticleChunk, insert_half_sets, reconstruct, reconstruct_half_maps
from .half_sets import HALF_SPLIT_SEED, half_sets, random_half_sets
from .fsc import fsc, fsc_tsv, resolution_at
from .mask import soft_circle_mask, soft_sphere_mask

__all__ = ["Backprojector", "HALF_SPLIT_SEED", "ParticleChunk", "half_sets", "insert_half_sets", "random_half_sets",
           "reconstruct", "reconstruct_half_maps", "fsc", "fsc_tsv", "resolution_at", "soft_circle_mask", "soft_sphere_mask"]

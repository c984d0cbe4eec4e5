"""Reconstruction from posed particles: back-projection, half maps, FSC, masks."""
from cryofastar_core.reconstruct.backproject import Backprojector, ParticleChunk, insert_half_sets, reconstruct, reconstruct_half_maps
from cryofastar_core.reconstruct.half_sets import HALF_SPLIT_SEED, half_sets, random_half_sets
from cryofastar_core.reconstruct.fsc import fsc, fsc_tsv, resolution_at
from cryofastar_core.reconstruct.mask import soft_circle_mask, soft_sphere_mask

__all__ = ["Backprojector", "HALF_SPLIT_SEED", "ParticleChunk", "half_sets", "insert_half_sets", "random_half_sets",
           "reconstruct", "reconstruct_half_maps", "fsc", "fsc_tsv", "resolution_at", "soft_circle_mask", "soft_sphere_mask"]

"""Simulated data with known answers: projection images of a volume (images.py, used by training) and
whole particle sets written as RELION files (particle_sets.py, ``cryofastar simulate``)."""

"""CryoFastAR engine: feed-forward cryo-EM pose estimation and reconstruction."""

__version__ = "0.1.0"

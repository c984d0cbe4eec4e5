"""Build configuration lives in setup.cfg; this file only adds the optional compiled slice kernels
(cryofastar_core/physics/compiled.py explains them). Without a C compiler the install goes on without
them and projections and reconstructions take torch's slower paths."""
from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "cryofastar_core.physics._slice_kernels",
    sources=["cryofastar_core/physics/slice_kernels.c"],
    # no fused multiply-adds: the kernel's positions and weights match the torch path's float32 arithmetic
    extra_compile_args=["-O3", "-ffp-contract=off"],
    optional=True,
)])

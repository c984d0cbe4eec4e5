"""Build configuration lives in setup.cfg; this file only adds the optional compiled insertion kernel
(cryofastar_core/reconstruct/compiled_insert.py explains it). Without a C compiler the install goes on
without it and reconstructions use torch's slower path."""
from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "cryofastar_core.reconstruct._insert_kernel",
    sources=["cryofastar_core/reconstruct/insert_kernel.c"],
    # no fused multiply-adds: the kernel's positions and weights match the torch path's float32 arithmetic
    extra_compile_args=["-O3", "-ffp-contract=off"],
    optional=True,
)])

"""Build script: pure-Python package plus optional compiled kernels.

``fastcl._C``    CPU kernels (C++/OpenMP, pybind11); built wherever a C++ compiler exists.
``fastcl._cuda`` CUDA kernels; built only when nvcc is found and FASTCL_BUILD_CUDA != "0".

Neither links against libtorch: kernels take raw pointers, sizes and dtype codes, and
Python validates the tensors. A failed compile never fails the install; fastcl then
falls back to PyTorch and ``fastcl info`` says why.
"""
from setuptools import setup

setup()

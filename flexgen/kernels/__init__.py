"""Native CPU kernels, compiled at first use with the machine's C compiler and cached.

PyTorch's CPU kernels are built for every shape; a few products of this project's decode
step run at about half of what the cores can do in them (flexgen/linear.py says which and by
how much). The kernels here are small C files shipped with the package, built by
:mod:`flexgen.kernels.build` the first time they are needed (about a second), cached under
``$FLEXGEN_CACHE/kernels`` by content, and loaded with ``ctypes``. Where no compiler, no
suitable CPU or no OpenMP runtime is found, the caller falls back to PyTorch and says why.
"""

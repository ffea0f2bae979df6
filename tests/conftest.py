"""Session-wide test setup.

Without a GPU, the Triton kernels run under Triton's CPU interpreter. TRITON_INTERPRET
must be set before the kernels are decorated, i.e. before anything imports
``fastcl.kernels.triton``, hence here. It only affects Triton kernels, which the
dispatcher never picks on CPU unless a test forces them.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

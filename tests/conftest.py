import os

import torch

# Triton kernels run in the Triton interpreter on machines without a GPU; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

#!/usr/bin/env python
"""MoE layer benchmark: ours vs the dense-matmul limit vs DeepSpeed-MoE (dropping and dropless), every variant
alternated iteration by iteration in the same processes. The harness lives in moetrain/bench/moe_layer.py; this
script runs it from a checkout:

    python bench/moe_layer.py --experts 64 --top-k 6 --hidden 256 [--tokens 4096] [--reps 3 --iters 5] [--out F]

`moetrain-bench` runs it at every shape of the suite and writes docs/benchmarks.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moetrain.bench.moe_layer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

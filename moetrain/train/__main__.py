"""python -m moetrain.train  (the same as moetrain-train)."""

import sys

from moetrain.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())

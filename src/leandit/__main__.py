"""`python -m leandit ...`: the same command as the `leandit` console script (`leandit.cli:main`),
for environments where the script is not on PATH (`torchrun -m leandit ...` works too)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

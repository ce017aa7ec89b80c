"""``python -m qtvit``: the ``qtvit`` command line."""

import sys

from .cli import main

# The guard matters: a child started with multiprocessing's "spawn"/"forkserver" (e.g. inductor's
# compile workers, DataLoader workers) re-imports the parent's main module as __mp_main__, and
# without it each child would run the whole command again.
if __name__ == "__main__":
    sys.exit(main())

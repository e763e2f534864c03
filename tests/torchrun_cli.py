"""Run several `trimode` command lines, in order, in each process of one torchrun launch (one start
of the ranks instead of one per command). argv[1]: a JSON list of argument lists."""

import json
import sys

from trimode.cli import main

for argv in json.loads(sys.argv[1]):
    if main(argv) != 0:
        raise SystemExit(f"trimode {' '.join(argv)} failed")

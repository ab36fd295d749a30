"""Remove this machine's paths from copied result files: a run folder as runs/..., the data cache as $MUDD_CACHE.

python3 scripts/experiments/scrub_paths.py FILE...
"""

import os
import re
import sys

RUNS = re.compile(r'(^|[\s"\'=])/(?:[^/\s"\']+/)*?(runs/)')  # the first runs/ segment of an absolute path
CACHE = re.compile(r'/(?:[^/\s"\']+/)*?\.cache/muddformer')

for path in sys.argv[1:]:
    if not os.path.isfile(path):  # an unmatched glob: nothing to scrub
        continue
    with open(path) as f:
        text = f.read()
    clean = CACHE.sub("$MUDD_CACHE", RUNS.sub(r"\1\2", text))
    if clean != text:
        with open(path, "w") as f:
            f.write(clean)

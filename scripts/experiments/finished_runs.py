"""Print the run folders of a `mudd compare` folder whose training finished (a validation loss at the last step).

python3 scripts/experiments/finished_runs.py COMPARE_FOLDER

A run cut off half-way is left out: its checkpoints stay behind on the machine that ran it, so copying its
metrics without them would make a fresh machine restart it on top of a partial log.
"""

import json
import sys
from pathlib import Path

for run in sorted(Path(sys.argv[1]).glob("runs/*/seed*")):
    try:
        steps = json.loads((run / "run.json").read_text())["train_config"]["max_steps"]
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, KeyError, ValueError):
        continue
    if any(r.get("step") == steps and "val_loss" in r for r in records):
        print(run)

"""`mudd compare`: settings (compare.json), the runs, the runner, the report and its statistics."""

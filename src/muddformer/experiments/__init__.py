"""Measuring and comparing: `mudd bench` (bench.py), `mudd compare` (compare/) and `mudd analyze` (analyze/)."""

"""`mudd analyze`: what a trained model does with its connections (probes.py), on which text
(tokens.py), drawn (plots.py)."""

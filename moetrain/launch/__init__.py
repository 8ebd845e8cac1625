"""Hydra's command line for moetrain-train (hydra_cli.py) and the jobs of a sweep (sweep.py)."""

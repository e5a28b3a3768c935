"""Performance measurements (not part of the importable library): `python -m launch.bench`."""

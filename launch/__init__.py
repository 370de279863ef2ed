"""NeMo-Run launch entry point (``launch/experiment.py``); see launch/README.md."""

"""Command-line entry points (`ghostvis-*` console scripts once installed; `python launch/NAME.py` in a checkout)."""

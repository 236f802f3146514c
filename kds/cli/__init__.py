"""Command-line programs: ``kds-cp`` (the control plane)."""

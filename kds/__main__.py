"""``python -m kds``: the same commands as ``kds-cp``."""

from kds.cli.cp import main

main(prog_name="python -m kds")

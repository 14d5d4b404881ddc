"""`python -m vdeploy`."""

from vdeploy.cli import main

main()

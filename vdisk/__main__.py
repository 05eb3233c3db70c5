"""`python -m vdisk ...` runs the `vdisk` command line (the same as the console script)."""
from vdisk.cli import run

if __name__ == "__main__":
    run()

"""`python -m vdisk.cli ...` is `vdisk ...` (kept beside `python -m vdisk`)."""
from vdisk.cli.main import run

if __name__ == "__main__":
    run()

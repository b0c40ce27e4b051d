"""``python -m triton_qat``: the command line of triton_qat.tools.cli."""

from triton_qat.tools.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m pixtral_cpp.cli`: the same as the `pixtral-cpp` command."""

from __future__ import annotations

from pixtral_cpp.cli import main

main(prog_name="pixtral-cpp")

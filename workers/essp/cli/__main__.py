"""`python -m essp.cli ...`: the `essp` command."""

from essp.cli.main import main

main()

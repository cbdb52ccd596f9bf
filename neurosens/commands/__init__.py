"""Subcommands of the `neurosens` command line, one module each."""

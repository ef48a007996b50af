"""Thin, typed clients shared by the workers, the CLI and the operators."""

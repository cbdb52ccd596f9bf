"""The package version, in one place (read by the package, the ops' info and report metadata)."""
__version__ = "0.1.0"

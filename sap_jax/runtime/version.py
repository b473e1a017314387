"""The release, in one place: the package metadata (pyproject.toml) and workdirs read it."""

VERSION = "0.2.0"

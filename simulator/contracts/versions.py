"""Installed package versions, for the files that record what made them (plan files, run reports)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def installed_version(name: str) -> str | None:
    """The installed distribution ``name``'s version, or None when it is not installed."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None

"""Moved to :mod:`abkd_deploy.staging` (shared by every command that writes a directory)."""

from abkd_deploy.staging import publish, staged_directory

__all__ = ["publish", "staged_directory"]

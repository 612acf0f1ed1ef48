"""User-facing failure kinds. Each is caught once at the CLI/UI edge and shown as one sentence with the fix."""

from __future__ import annotations


class EdgegenError(Exception):
    """Base class. `str(err)` is the whole message a user sees: what is wrong and how to fix it."""

    exit_code = 1


class UsageError(EdgegenError):
    """Bad input or usage: a flag, a size, a prompt file. Exit code 2."""

    exit_code = 2


class ModelFolderError(UsageError):
    """The --model folder is missing, not a diffusers folder, unsupported, or holds pickle weights."""


class BundleError(UsageError):
    """An engine bundle is missing, from an unknown schema, tampered with, or not built for this machine."""


class NetworkBlockedError(EdgegenError):
    """Library code tried to reach the network; edgegen never does."""


class GenerationCancelled(EdgegenError):
    """The user cancelled a running generation."""

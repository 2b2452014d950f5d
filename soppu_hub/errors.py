"""User-facing errors: one line that says what is wrong and how to fix it.

Only these mean "the user can fix this": the CLI prints them as one line and exits 2. Anything else is a bug
(or a library failing) and says so.
"""


class SoppuError(Exception):
    """Base class; the CLI prints str(error) on one line and exits non-zero."""


class ConfigError(SoppuError):
    """A flag or setting is out of range, unknown, or asks for what this machine lacks."""


class EvalFileError(SoppuError):
    """An --eval-file or --probe-file is missing, empty or malformed (the message names the file and line)."""


class AdapterError(SoppuError):
    """An input adapter cannot be read or is not something JD can compress."""


class IncompatibleAdaptersError(SoppuError):
    """Adapters given together cannot share a basis (different base model or module shapes)."""


class BundleError(SoppuError):
    """A shared-basis bundle on disk is missing, corrupt or inconsistent."""


class CollectionError(SoppuError):
    """A published collection is missing, damaged, or does not fit the adapter joining it."""

"""User-facing errors: one line that says what is wrong and how to fix it."""


class SoppuError(Exception):
    """Base class; the CLI prints str(error) on one line and exits non-zero."""


class AdapterError(SoppuError):
    """An input adapter cannot be read or is not something JD can compress."""


class IncompatibleAdaptersError(SoppuError):
    """Adapters given together cannot share a basis (different base model or module shapes)."""


class BundleError(SoppuError):
    """A shared-basis bundle on disk is missing, corrupt or inconsistent."""

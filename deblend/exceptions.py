"""Errors and warnings raised by deblend, kept in one place."""

__all__ = ["InputError", "DeblendWarning", "NoSourcesWarning", "WCSWarning"]


class InputError(ValueError):
    """An input file cannot be used; the message names the file and the cause.

    Parameters
    ----------
    path : str or os.PathLike
        The offending file.
    reason : str
        What is wrong with it, in words a user can act on.
    """

    def __init__(self, path, reason):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep picklable across worker processes
        return (type(self), (self.path, self.reason))


class DeblendWarning(UserWarning):
    """A fallback was taken while deblending (recorded, never hidden)."""


class NoSourcesWarning(DeblendWarning):
    """No source was detected; the outputs are an empty catalog and an all-zero map."""


class WCSWarning(UserWarning):
    """The WCS of an input is missing or broken; pixel outputs are still written."""

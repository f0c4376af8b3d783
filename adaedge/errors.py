"""Every error a user can cause derives from :class:`AdaedgeError`; the CLI prints it as one line.

Each class also derives from the built-in exception a Python caller would expect
(``ValueError`` for bad values, ``RuntimeError`` for what the machine lacks), so code that caught
those before keeps working.
"""

from __future__ import annotations


class AdaedgeError(Exception):
    """Base of every error a user can cause: bad input, a missing backend, a bad option."""


class UsageError(AdaedgeError, ValueError):
    """An option, argument or name that does not fit (an unknown model, a bad flag value)."""


class UnknownName(UsageError, KeyError):
    """A name that is not registered (a model, a family, a backend option)."""

    def __str__(self) -> str:        # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ConfigError(UsageError, TypeError):
    """A model config that the model's builder does not take."""


class BundleError(AdaedgeError, ValueError):
    """A bundle that cannot be used: missing, corrupt, foreign, or from an unknown schema."""


class InputError(AdaedgeError, ValueError):
    """Clips (or options) that do not fit the bundle."""


class BackendUnavailable(AdaedgeError, RuntimeError):
    """The backend's library, or the device it needs, is not installed here."""


class MissingExtra(AdaedgeError, ImportError):
    """A feature whose optional dependencies (an extra of the adaedge package) are not installed."""

    def __init__(self, feature: str, extra: str, missing: str) -> None:
        super().__init__(f"{feature} needs the '{extra}' extra ({missing} is not installed): "
                         f"pip install 'adaedge[{extra}]'")
        self.extra = extra


class ExportError(AdaedgeError, ValueError):
    """An export that cannot be done as asked (bad destination, unknown family, bad sizes)."""


class CheckpointError(AdaedgeError, ValueError):
    """A checkpoint that cannot be read, or does not fit the model it is loaded into."""


class CalibrationError(AdaedgeError, ValueError):
    """Calibration that cannot be done as asked (budget out of reach, data that does not fit)."""


class SourceError(AdaedgeError, RuntimeError):
    """A camera, file or URL that cannot be opened, read or written."""


class ProcessorError(AdaedgeError, RuntimeError):
    """Forms that are known to compute wrong on this processor (int8 arithmetic whose kernels
    here saturate), refused instead of run."""


def require(module: str, feature: str, extra: str) -> None:
    """Raise :class:`MissingExtra` unless ``module`` can be imported."""
    import importlib.util
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):     # a module blocked in sys.modules (set to None)
        found = False
    if not found:
        raise MissingExtra(feature, extra, module)


__all__ = ["AdaedgeError", "UsageError", "UnknownName", "ConfigError", "BundleError", "InputError",
           "BackendUnavailable",
           "MissingExtra", "ExportError", "CheckpointError", "CalibrationError", "SourceError",
           "ProcessorError",
           "require"]

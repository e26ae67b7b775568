"""Errors of the models layer. Every message says what went wrong and how to fix it."""

from __future__ import annotations


class ModelError(Exception):
    """Base class: a model could not be found, read, pulled or removed."""


class RegistryError(ModelError):
    """models.toml (the catalogue, or the user's own) has a bad entry."""


class UnknownModelError(ModelError):
    """A name that is neither installed, in the catalogue, nor a path to a GGUF file."""

    def __init__(self, name: str, suggestions: list[str]):
        self.name = name
        self.suggestions = suggestions
        hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
        super().__init__(
            f"unknown model '{name}'.{hint} "
            "See `pie-local list --catalog` for the models pie-local knows, or pull any hub GGUF with "
            "`pie-local pull OWNER/REPO:QUANT`."
        )


class ModelNotInstalledError(ModelError):
    """A known model whose files are not on this machine."""


class GGUFError(ModelError):
    """A file that is not a readable GGUF."""


class CorruptGGUFError(GGUFError):
    """A readable GGUF whose contents are impossible (two equal tokens, a NaN epsilon, ...): fed
    to llama.cpp or the driver, it would abort the process instead of failing cleanly."""


class UnsupportedArchitectureError(GGUFError):
    """A GGUF of an architecture the native driver does not run."""

    def __init__(self, path: object, arch: str, supported: tuple[str, ...]):
        self.arch, self.supported = arch, supported
        super().__init__(f"{path}: architecture '{arch}' is not supported by this pie-local's driver "
                         f"(supported: {', '.join(supported)}). `pie-local list --catalog` lists models "
                         "of the supported architectures.")


class PullError(ModelError):
    """A download failed."""


class HubNotFoundError(PullError):
    """404: the repository or file does not exist (or is private and the request was anonymous)."""


class HubAuthError(PullError):
    """401/403: the repository is gated or private."""


class OfflineError(PullError):
    """A download was needed but the hub cannot be reached or offline mode is on."""


class DiskFullError(PullError):
    """Not enough free space for the download."""


class ChecksumError(PullError):
    """The downloaded bytes do not match the expected sha256."""


class QuantNotFoundError(PullError):
    """No file in the repository matches the requested quantization."""


class PullCancelled(PullError):
    """The pull was cancelled; the partial file is kept so the next pull resumes it."""

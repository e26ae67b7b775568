"""What the user is told when something fails: a message, how to fix it, and an exit status.

Commands and the TUI's backend raise ``UserError`` for problems they detect themselves; errors
from the layers below are turned into one by ``explain``. The CLI's dispatcher
(``pie_local.cli.main``) prints it as ``pie-local: error: MESSAGE`` (plus a ``Fix:`` line) and
exits with its status; the TUI shows it as a notification. Exceptions are classified by class
name, so explaining an error never imports the runtime or the driver.

Exit status of every ``pie-local`` command:

    0    success
    1    error: the command line was fine but the command could not be carried out (a model that
         is not installed, a failed download, a driver or inferlet failure, no terminal to ask...)
    2    usage error, as argparse reports its own: the command line is wrong by itself (an option
         value out of range, an unknown inferlet, arguments the inferlet rejects)
    130  interrupted (Ctrl-C)
    141  stdout was closed by its reader (`pie-local list | head`)
"""

from __future__ import annotations

ERROR = 1
USAGE = 2

# DriverError.status -> what to do about it (the driver's status names, see pie_driver.h)
DRIVER_FIXES = {
    "io": "check the path and the file's permissions",
    "format": "the file is damaged or not a GGUF model: download it again (pie-local pull NAME)",
    "unsupported": "this architecture or device is not supported yet: use a model of a supported architecture "
                   "(`pie-local list --catalog` lists them)",
    "out_of_memory": "free memory, or try a smaller model or quantization",
}


class UserError(Exception):
    """A problem the user can fix: shown as its message and fix, never as a traceback."""

    exit_code = ERROR

    def __init__(self, message: str, fix: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message}\nFix: {self.fix}" if self.fix else self.message


class UsageError(UserError):
    """The command line is wrong by itself (exit status 2, like argparse's own errors)."""

    exit_code = USAGE


def explain(exc: BaseException) -> UserError | None:
    """The ``UserError`` for an exception from any layer; None for an unexpected one (a bug)."""
    if isinstance(exc, UserError):
        return exc
    kinds = {cls.__name__ for cls in type(exc).__mro__}
    text = str(exc) or type(exc).__name__
    if "ModelError" in kinds:  # pie_local.models errors already say how to fix them
        return UserError(text)
    if "OutOfPagesError" in kinds:
        return UserError(f"out of KV cache pages: {text}",
                         "lower max tokens, end other running inferlets, or start a new session")
    if "LimitExceeded" in kinds:
        return UserError(text, "lower max tokens for this session")
    if "InferletError" in kinds:  # an inferlet that does not load, or arguments it rejects
        return UsageError(f"the inferlet could not start: {text}",
                          "`pie-local run --list` shows the standard inferlets, "
                          "`pie-local run NAME -- --help` an inferlet's parameters")
    if kinds & {"DriverNotFound", "AbiMismatch"}:
        return UserError(f"the native driver is not usable: {text}",
                         "reinstall pie-local so its driver is built, then run `pie-local doctor`")
    if "DriverError" in kinds:
        fix = DRIVER_FIXES.get(getattr(exc, "status", ""), "run `pie-local doctor` to check the install")
        return UserError(f"the inference driver failed: {text}", fix)
    if "TokenizerError" in kinds:
        return UserError(f"the model's vocabulary cannot be used: {text}", DRIVER_FIXES["format"])
    if "ChatTemplateError" in kinds:
        return UserError(f"the model's chat template cannot be used: {text}",
                         "set a chat_template for the model in models.toml")
    if "SnapshotError" in kinds:
        return UserError(f"the saved KV cannot be used: {text}", "start a new session")
    if "ServerNotFound" in kinds:
        return UserError(text, "start one with `pie-local serve`, or add --local to run in this process")
    if "ClientError" in kinds:
        return _server_refusal(exc)
    if isinstance(exc, FileNotFoundError):
        return UserError(text, "check the path, or pull the model again")
    if isinstance(exc, PermissionError):
        return UserError(text, "choose a location you can write to")
    if isinstance(exc, OSError) and exc.errno == 28:
        return UserError(f"disk full: {text}", "free some space and retry")
    if isinstance(exc, OSError):
        return UserError(text)
    if isinstance(exc, ImportError):
        return UserError(f"a pie-local component is missing: {text}", "reinstall pie-local")
    return None


def _server_refusal(exc: BaseException) -> UserError:
    """A pie-local server's error answer (pie_local.server.ClientError: status, message, code, param)."""
    status, code = getattr(exc, "status", 0), getattr(exc, "code", None)
    message = getattr(exc, "message", "") or str(exc)
    if status == 401:
        return UserError(f"the server wants an API key: {message}", "set PIE_LOCAL_API_KEY to the server's key")
    if status == 403:
        return UserError(message, "run it in this process instead, with --local")
    if code == "run_not_found":
        return UserError(message, "`pie-local ps` lists the runs")
    if status == 400 and getattr(exc, "param", None) in ("inferlet", "args"):
        return UsageError(message, "`pie-local run NAME -- --help` shows an inferlet's parameters")
    if status == 503:
        return UserError(message, "retry in a moment")
    if code == "model_not_found" or status < 500:
        return UserError(message)  # the server's message names the problem (and how to get a model)
    return UserError(f"the server failed: {message}", "see the server's log")

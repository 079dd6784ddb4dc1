"""The errors a user can act on, below every other module: the command line reports them in one line and exits
with code 2 (HYDRA_FULL_ERROR=1 shows the traceback)."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in a config, a data file or a path, not in thinkforge."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the key."""


class Interrupted(BaseException):
    """A stop asked for from outside (SIGTERM, SIGINT, SIGUSR1): the run keeps what it computed and exits with code
    130. A BaseException, so that no `except Exception` on the way up swallows it."""

    def __init__(self, signal_name: str, *, forced: bool = False) -> None:
        super().__init__(f"interrupted by {signal_name}")
        #: stopped wherever it was (a second Ctrl-C), not at a stop point: nothing may be saved
        self.signal_name, self.forced = signal_name, forced


#: the exit codes of every command
EXIT_DONE, EXIT_FAILED, EXIT_USER_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


def require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def one_of(value: str, choices: tuple[str, ...], key: str) -> None:
    require(value in choices, key, f"must be one of {', '.join(choices)}; got {value!r}")

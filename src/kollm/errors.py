"""Errors a user can cause. Each ends as one clear message and an exit code in the CLI, never a traceback."""

from __future__ import annotations


class KollmError(Exception):
    """Base class: `str(err)` is the whole message shown to the user; `exit_code` is what the CLI returns."""

    exit_code = 1
    step: str | None = None  # the pipeline step that raised it, set by the runner

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")


class ConfigError(KollmError):
    """kollm.yaml (or a CLI argument) is invalid. Exit code 2."""

    exit_code = 2

    def __init__(self, problems: list[str] | str, *, source: str | None = None, hint: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        head = f"{source}: " if source else ""
        if len(self.problems) == 1:
            text = head + self.problems[0]
        else:
            text = head + f"{len(self.problems)} problems\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(text, hint=hint)


class StepFailed(KollmError):
    """A step could not finish (bad data, a validation gate, an exception in user code). Exit code 1."""

    exit_code = 1


class Superseded(StepFailed):
    """An attempt of a step found its step published meanwhile (by a retry or another runner: its lease,
    kollm.pipeline.lease.Lease, has ended), so it stops without writing a checkpoint or its outputs. Never retried."""


class StepCrashed(StepFailed):
    """A step raised an unexpected exception (not a KollmError) and used up its retries. Exit code 5, so an
    executor running `kollm step run` in a child process can tell a crash worth retrying from a user error."""

    exit_code = 5


class GateFailed(KollmError):
    """The evaluation quality gate rejected the candidate; nothing downstream runs. Exit code 3."""

    exit_code = 3


class NotFound(KollmError):
    """A run, model, version or alias the user named does not exist. Exit code 4."""

    exit_code = 4

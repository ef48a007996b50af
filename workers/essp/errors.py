"""Errors that name their cause, shared by the library, the CLI and the operators."""

from __future__ import annotations


class EsspError(RuntimeError):
    """Base of ESSP's own errors: the message is meant for the user as it stands."""


class UserError(EsspError):
    """What the user asked for cannot be done as asked (a bad param, a run another DAG run trains): the message,
    one line, says what to change. A task it fails shows that line, without a traceback, and is not retried
    (essp.operators.refusal)."""


def one_line(error: BaseException | str) -> str:
    """An error's message on one line (whitespace runs, newlines included, become one space)."""
    return " ".join(str(error).split())


class ServiceUnavailable(EsspError):
    """A service ESSP needs (Redis, Kafka, S3, PostgreSQL, Airflow) does not answer."""

    def __init__(self, service: str, address: str, cause: object, hint: str | None = None) -> None:
        self.service = service
        self.address = address
        hint = hint or "start the local stack with `essp infra up`, or check the ESSP_* settings"
        super().__init__(f"{service} at {address} is not reachable: {cause} ({hint})")


class ServiceSaturated(ServiceUnavailable):
    """A service that answers but refuses more data for now (Redis at its ``maxmemory``): callers that
    ride out an outage wait on this too (back-pressure), with a message that says why."""

    def __init__(self, service: str, address: str, cause: object, hint: str) -> None:
        self.service = service
        self.address = address
        EsspError.__init__(self, f"{service} at {address} is full: {cause} ({hint})")


class MalformedMessage(EsspError):
    """A Kafka message that does not match the schema its topic promises."""

    def __init__(self, topic: str, reason: str) -> None:
        self.topic = topic
        self.reason = reason
        super().__init__(f"malformed message on {topic}: {reason}")


def describe_validation(exc: Exception) -> str:
    """A pydantic ValidationError as ``param: reason`` parts, one per problem, ``; ``-joined."""
    problems = []
    for err in exc.errors():  # type: ignore[attr-defined]
        where = ".".join(str(p) for p in err["loc"]) or "params"
        message = str(err["msg"]).removeprefix("Value error, ")
        problems.append(message if where == "params" and ":" in message else f"{where}: {message}")
    return "; ".join(problems)

"""How the command-line mains start and end.

    if __name__ == "__main__":
        cli.run(main)

`run` is `absl.app.run` with two differences a user sees only when something is wrong:
- an override of a config field that does not exist (`--config.train.stepz=3`) is one line naming the flag
  and the closest field (`--config.train.steps`), where ml_collections raises from inside flag parsing;
- the project's own errors (`ValueError` and its subclasses such as `CheckpointError`, `OSError` naming a
  file, `TrainingStopped`) end the process with exit code 1 and their message as the last line, without a
  traceback (set DEEPSEEK_JAX_TRACEBACK=1 to get it) and without a thread of a failed save printing after it.
"""

import os
import re
import sys

from absl import app, flags, logging

from deepseek_jax.train.loop import TrainingStopped

TRACEBACK_VARIABLE = "DEEPSEEK_JAX_TRACEBACK"
# ml_collections' message for a missing field: "'stepz'\nDid you mean "steps" instead of "stepz"?"
_MISSING_FIELD = re.compile(r"""^['"]?'(?P<field>[^'"]+)'""")


def run(main) -> None:
    """`app.run(main)` with the flag parsing and error messages described in the module docstring."""
    app.run(_with_one_message_errors(main), flags_parser=parse_flags)


def parse_flags(argv: list[str]) -> list[str]:
    """Parses `argv` into absl's FLAGS; a flag error is one line and exit code 1."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _exit_with(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help on flags.")
    except (AttributeError, KeyError) as e:  # ml_collections: an override names a field the config lacks
        message = unknown_override_message(argv, e)
        if message is None:
            raise
        _exit_with(f"Error: {message}")


def unknown_override_message(argv: list[str], error: Exception) -> str | None:
    """The message for `error`, raised by ml_collections while applying a `--config.<path>=...` override
    of `argv` whose path names a missing field; None when `error` is something else."""
    cause = error.args[0] if error.args else error
    text = str(cause.args[0] if isinstance(cause, KeyError) and cause.args else cause)
    found = _MISSING_FIELD.match(text)
    if found is None:
        return None
    field = found["field"]
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        flag = arg.split("=", 1)[0]
        path = flag[len("--config."):].split(".")
        if field not in path:
            continue
        at = path.index(field)
        suggestion = re.search(r'Did you mean "([^"]+)"', text)
        hint = ""
        if suggestion:
            hint = f"; did you mean --config.{'.'.join(path[:at] + [suggestion[1]] + path[at + 1:])}?"
        parent = "config" + "".join(f".{p}" for p in path[:at])
        return f"{flag}: {parent} has no field {field!r}{hint}"
    return None


def quiet_failed_save_threads() -> None:
    """Keeps a failed save to one message. When a checkpoint write fails, orbax's background threads log the
    error with its traceback (the Checkpointer re-raises the same error, which ends the run), and tensorstore
    completes the cancelled writes later on its own threads, each reporting orbax's closed event loop as an
    unraisable exception. Both are dropped; every other log record and exception is kept."""

    def drop_closed_loop_noise(unraisable):
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and "Event loop is closed" in str(value)):
            sys.__unraisablehook__(unraisable)

    sys.unraisablehook = drop_closed_loop_noise
    logging.get_absl_logger().addFilter(
        lambda record: "_SignalingThread.run() raised an exception" not in record.getMessage())


def stop(message: str) -> None:
    """Ends the process at once with `message` as its last line and exit code 1 (no thread of a failed save
    may keep it alive, nor print after the message: stderr is pointed at /dev/null first)."""
    sys.stdout.flush()
    sys.stderr.flush()
    message_fd = os.dup(2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    os.write(message_fd, f"\n{message}\n".encode())
    os._exit(1)


def _with_one_message_errors(main):
    def wrapped(argv: list[str]) -> None:
        quiet_failed_save_threads()
        try:
            main(argv)
        except (ValueError, OSError, TrainingStopped) as e:
            if os.environ.get(TRACEBACK_VARIABLE):
                raise
            stop(f"Error: {e}\n(set {TRACEBACK_VARIABLE}=1 to see where it was raised)")

    return wrapped


def _exit_with(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.exit(1)

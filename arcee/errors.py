"""User errors: one line on stderr and exit status 2; the traceback only when asked for.

A user error is one the user can fix from its message alone: a bad config value or argument, a
missing, unreadable or unwritable file, damaged data. Every entry point (``train.py``,
``sample.py``, ``evaluate.py``, ``data_prep``) runs its main function through ``run_main``, which
prints such an error as::

    error: <what is wrong, naming the key / file, and what is expected>
    (HYDRA_FULL_ERROR=1 shows the traceback)

and exits with status 2. Anything else (a bug) keeps Python's full traceback. Hydra entry points
also get Hydra's own ``Error executing job with overrides: [...]`` line first when the error is
raised inside the job. Depends on nothing of ours.
"""
from __future__ import annotations

import numbers
import os
import re
import sys

EXIT_USER_ERROR = 2
_DETAIL = re.compile(r"^\s*(full_key|object_type|reference_type|parent_node|child_node|value)\s*[:=]")


class UserError(RuntimeError):
    """An error the user fixes from its message (bad input, damaged data); printed in one line."""


def user_error_types() -> tuple[type, ...]:
    """Exception types reported as user errors (OmegaConf / Hydra config errors included)."""
    types: tuple[type, ...] = (UserError, ValueError, OSError, ImportError)
    try:
        from omegaconf.errors import OmegaConfBaseException
        types += (OmegaConfBaseException,)
    except ImportError:  # pragma: no cover
        pass
    try:
        from hydra.errors import HydraException
        types += (HydraException,)
    except ImportError:  # pragma: no cover
        pass
    return types


def _flatten(text: str) -> str:
    """A possibly multi-line message as one line: OmegaConf's detail lines dropped, Hydra's search path cut."""
    text = text.split("\nConfig search path:")[0]
    out = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or _DETAIL.match(raw):
            continue
        if not out:
            out = line
        elif out.endswith(":"):
            out += " " + line
        elif raw[:1].isspace() and not out.endswith("."):  # an indented list item after the first
            out += ", " + line
        else:
            out += ("; " if not out.endswith(".") else " ") + line
    return out


def user_message(e: BaseException) -> str:
    """One line for a user error: the message, with the config key and the cause's message when they add to it."""
    msg = _flatten(str(e)) or type(e).__name__
    key = getattr(e, "full_key", None)
    if key and not re.search(rf"(?<![\w.]){re.escape(str(key))}(?!\w)", msg):
        msg = f"{key}: {msg}"
    cause = e.__cause__
    if cause is not None and type(cause).__module__.startswith("omegaconf"):  # Hydra's composition errors
        detail = _flatten(str(cause))
        if detail and detail not in msg:
            msg = f"{msg}: {detail}"
    return msg


def run_main(main, *args, debug: bool | None = None, hint: str = "HYDRA_FULL_ERROR=1"):
    """Call ``main(*args)``; a user error is printed in one line plus a hint, and exits with status 2.

    ``debug`` (default: ``HYDRA_FULL_ERROR=1`` in the environment) re-raises it with its traceback.
    For Hydra entry points, ``HYDRA_FULL_ERROR=1`` is set while ``main`` runs so that Hydra raises
    instead of printing its own multi-line report; ``hint`` names the switch that shows tracebacks.
    """
    user_set = os.environ.get("HYDRA_FULL_ERROR")
    debug = user_set == "1" if debug is None else debug
    if not debug:
        os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        return main(*args)
    except BrokenPipeError:  # stdout closed early (`... | head`): not a mistake in the input
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        raise SystemExit(1) from None
    except user_error_types() as e:
        if debug:
            raise
        print(f"error: {user_message(e)}\n({hint} shows the traceback)", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
    finally:
        if user_set is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = user_set


def require(ok: bool, key: str, value, expected: str) -> None:
    """Raise ``ValueError("<key> must be <expected>, got <value>")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{key} must be {expected}, got {value!r}")


def is_int(v) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def typed_config(cfg, schema, required: dict[str, str] | None = None):
    """``cfg`` (a plain Hydra config) checked against the dataclass ``schema``: unknown keys and values
    that do not convert to the field types raise OmegaConf errors naming the key; each key of
    ``required`` (key -> what it expects) must be set. Returns the typed config."""
    from omegaconf import OmegaConf

    typed = OmegaConf.merge(OmegaConf.structured(schema), cfg)
    for key, expected in (required or {}).items():
        if OmegaConf.is_missing(typed, key):
            raise ValueError(f"{key} is required: {expected} ({key}=...)")
    return typed

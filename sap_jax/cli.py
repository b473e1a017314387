"""What the command lines share: ``--config=PATH`` with ``--config.FIELD=VALUE`` overrides,
checked and parsed once, with one line and exit code 2 for any problem (absl would answer with
a traceback or "FATAL Flags parsing error" and exit code 1)."""

from __future__ import annotations

import sys

from absl import app, flags

from sap_jax.runtime import errors

FLAGS = flags.FLAGS


def config_path(argv: list[str]) -> str | None:
    """The PATH of ``--config=PATH`` (or ``--config PATH``) in ``argv``; None if absent."""
    path = None
    for i, arg in enumerate(argv[1:], 1):
        if arg == "--":
            break
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
    return path


def parse_flags(argv: list[str]) -> tuple[list[str] | None, str | None]:
    """Parse the command line once, as app.run would: the arguments left over, or the problem
    as one line (a config file that is missing or does not load, an override of the wrong
    type, a missing required flag), which absl would answer with a traceback or "FATAL Flags
    parsing error" and exit code 1."""
    import os

    path = config_path(argv)
    if path is not None and not os.path.isfile(path):
        return None, f"config file {path} does not exist (--config=configs/NAME.py)"
    app.define_help_flags()  # as app.run does: --help and friends print the usage
    try:
        rest = FLAGS(argv)  # also loads the config file and applies the overrides
        if path is not None:
            FLAGS.config  # noqa: B018 - loading happens on first access
    except flags.Error as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001 - whatever the user's config file raises
        return None, f"config file {path} cannot be loaded: {type(e).__name__}: {e}"
    return rest, None


def _load_config(argv: list[str]):
    """The config named by ``--config=PATH`` in ``argv`` (None if absent or not loadable:
    absl reports a missing or bad --config itself, with its own message)."""
    from sap_jax.train import config as config_lib

    path = config_path(argv)
    if not path:
        return None
    try:
        return config_lib.load_file(path)
    except errors.ConfigError:
        return None


def check_overrides(argv: list[str]) -> str | None:
    """The problem with a ``--config.PATH=VALUE`` argument whose PATH is malformed or names no
    field of the config, if any.

    ml_collections resolves override paths while absl defines the flags, and
    answers these with a bare ValueError/AttributeError traceback; this check
    runs first and says what is wrong instead.
    """
    from flax import traverse_util
    from ml_collections.config_flags import config_path

    config = None
    for arg in argv[1:]:
        if arg == "--":
            break
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config."):].split("=", 1)[0]
        try:
            config_path.split(path)
        except ValueError:
            return (f"malformed override {arg!r}: use --config.FIELD=VALUE with a dotted "
                    "field name from the config, e.g. --config.budget.p=0.5")
        config = config if config is not None else _load_config(argv)
        if config is None:
            return None
        fields = [".".join(k) for k in traverse_util.flatten_dict(config.to_dict())]
        if path not in fields:
            near = errors.close_fields(path, fields)
            hint = f" Did you mean {', '.join(near)}?" if near else ""
            return f"override {arg!r}: the config has no field {path!r}.{hint}"
    return None



def parse_or_exit(argv: list[str]) -> list[str]:
    """:func:`check_overrides` then :func:`parse_flags`; the leftover arguments, or one line on
    stderr and exit code 2."""
    problem = check_overrides(argv)
    rest = None
    if not problem:
        rest, problem = parse_flags(argv)
    if problem:
        print(f"error: {problem}", file=sys.stderr, flush=True)
        sys.exit(errors.EXIT_BAD_INPUT)
    return rest

"""What every scoat_jax command shares: flag parsing, quiet logs, errors and exit codes.

Each command (`python -m scoat_jax.main`, `.predict`, `.followup`, `.report`,
`.datasets.build`, `.data.phantom`) defines its absl flags and calls
`run_command(main)`; its `main(argv)` hands the work to `run(argv, call)`.

Exit status, the same for every command:

  0    done
  2    bad input, flag or config: one line `error: ...` on stderr naming the
       file or flag and the fix (also for a misspelt `--config.` field, with
       the closest field name); nothing is written
  3    training diverged (a NaN or Inf loss; the last good checkpoint is kept)
  130  interrupted (Ctrl-C or SIGTERM; training saves its state first)

Anything else is a bug. Logs: a command prints its own progress, evaluation
lines, warnings and where its results went; the INFO lines of the libraries
underneath (Orbax, TFDS, JAX) appear only with `--verbosity=1` or more.
"""
from __future__ import annotations

import difflib
import importlib.util
import logging as py_logging
import pathlib
import re
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130

_PACKAGE_DIR = str(pathlib.Path(__file__).resolve().parents[1])


class DivergedError(FloatingPointError):
  """Training stopped on a non-finite loss (exit status 3)."""


def fail(message: str, status: int = EXIT_BAD_INPUT) -> NoReturn:
  """Prints `error: <message>` on one line and exits with `status`."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(status)


def echo(text: str) -> None:
  """Prints text to stdout even where the terminal cannot show every character (e.g. '±')."""
  encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
  sys.stdout.write(text.encode(encoding, "replace").decode(encoding))
  sys.stdout.flush()


# ----------------------------------------------------------------------------- flags

def expanded_args(argv: Sequence[str]) -> list[str]:
  """The command-line arguments after argv[0], with every --flagfile read in."""
  from absl import flags
  try:
    return list(flags.FLAGS.read_flags_from_files(list(argv[1:]), force_gnu=False))
  except flags.Error:
    return list(argv[1:])


def _load_config_file(spec: str):
  """The ConfigDict a `--config=FILE[:ARG]` names, or None if it does not load."""
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    return None
  module_spec = importlib.util.spec_from_file_location("_scoat_config_probe", file)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except  (only used to word an error)
    return None


def _field_paths(config, prefix: str = "") -> list[str]:
  out = []
  for key, value in config.items():
    path = f"{prefix}{key}"
    out.append(path)
    if hasattr(value, "items"):
      out += _field_paths(value, path + ".")
  return out


def _config_override_error(argv: Sequence[str], error: Exception) -> str:
  """One line for a `--config` file or `--config.<field>` override that failed to apply."""
  args = expanded_args(argv)
  spec = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
  if spec is None:
    return f"--config: {str(error).splitlines()[0]}"
  config = _load_config_file(spec)
  if config is None:
    return (f"--config={spec}: cannot load this config file; give a file such as "
            "scoat_jax/configs/default.py (or --flagfile=launch/<name>.cfg).")
  fields = _field_paths(config)
  for arg in args:
    if not arg.startswith("--config."):
      continue
    name = arg[len("--config."):].split("=", 1)[0]
    if name in fields:
      continue
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.5)
    if not close:  # e.g. a field that moved into a sub-dict: widths -> model.widths
      leaves = {f.rpartition(".")[2]: f for f in reversed(fields)}
      close = [leaves[l] for l in difflib.get_close_matches(
          name.rpartition(".")[2], list(leaves), n=1, cutoff=0.6)]
    hint = f"; did you mean --config.{close[0]}?" if close else ""
    return f"--config.{name}: {spec} has no such field{hint}"
  return f"--config={spec}: {str(error).splitlines()[0]}"


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing with every mistake as one `error:` line and exit status 2."""
  from absl import flags
  try:
    rest = flags.FLAGS(list(argv))
    for name in flags.FLAGS:  # a config file that fails to load fails on first use
      if type(flags.FLAGS[name]).__name__ == "_ConfigFlag" and flags.FLAGS[name].present:
        hasattr(flags.FLAGS[name].value, "to_dict")  # raises OSError for a bad file
    return rest
  except flags.Error as e:
    network = next((a.split("=", 1)[1] for a in expanded_args(argv)
                    if a.startswith("--config.model=")), None)
    if network is not None:
      fail(f"--config.model={network}: config.model holds the network's options; pick the "
           f"network with --config.model_name={network} (or "
           f"--config=scoat_jax/configs/default.py:{network} for its options too).")
    fail(str(e).splitlines()[0] + " (--help lists the flags).")
  except (KeyError, AttributeError, TypeError, ValueError, OSError) as e:
    # ml_collections raises these while applying --config and its overrides.
    fail(_config_override_error(argv, e))


# ----------------------------------------------------------------------------- logs

def _verbose() -> bool:
  """Whether --verbosity asks for 1 or more (library INFO lines, tracebacks)."""
  from absl import flags
  return flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].value >= 1


class _LibraryInfoFilter(py_logging.Filter):
  """Drops the INFO (and DEBUG) records of libraries; scoat_jax's own and warnings pass."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return (_verbose() or record.levelno >= py_logging.WARNING
            or record.pathname.startswith(_PACKAGE_DIR))


def quiet_library_logs() -> None:
  """Installs the filter on absl's handler (idempotent)."""
  from absl import logging
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
    handler.addFilter(_LibraryInfoFilter())


# ----------------------------------------------------------------------------- running

def run_command(main: Callable[[list[str]], None]) -> None:
  """`absl.app.run(main)` with this module's flag parsing and log filter."""
  from absl import app
  from scoat_jax.common import signals
  signals.terminate_as_interrupt()  # SIGTERM ends a command as Ctrl-C does: status 130
  quiet_library_logs()
  app.run(main, flags_parser=parse_flags)


def _traceback_if_verbose() -> None:
  """With --verbosity=1 or more, the traceback behind an error line (for bug reports)."""
  if _verbose():
    import traceback
    traceback.print_exc(file=sys.stderr)


def _interrupted(tool: str, what: str) -> str:
  """What an interrupted command stopped doing and what it left.

  `what` is the KeyboardInterrupt's text: a command's own account (training:
  the step it saved; predict: the scans it finished), or only which signal
  (`signals`), or nothing (Ctrl-C outside any handler).
  """
  how = re.fullmatch(r"(?:stopped by )?(Ctrl-C \(SIGINT\)|SIGTERM|signal \d+)?", what)
  if how is None:
    return what
  return (f"{tool} stopped by {how.group(1) or 'Ctrl-C (SIGINT)'} before it finished; every "
          "file it wrote is complete (each is written whole or not at all), the rest were not "
          "written")


def run(argv: Sequence[str], call: Callable[[], object], *, required: Sequence[str] = (),
        show: str | pathlib.Path | None = None, positional: bool = False,
        compilation_cache_dir: str | None = None) -> None:
  """The shared body of a command's `main`: checks, set-up, the work, the exit status.

  Args:
    argv: what absl left over; refused unless `positional`.
    call: does the work. Its ValueError or OSError becomes one line `error:
      ...` and status 2, DivergedError status 3, KeyboardInterrupt status 130.
    required: names of flags that must be given.
    show: a text file to print on success (the table the command wrote).
    positional: leftover arguments are allowed (the caller uses them).
    compilation_cache_dir: enable JAX's persistent compilation cache there.
  """
  from absl import flags, logging
  if len(argv) > 1 and not positional:
    fail(f"unexpected arguments {list(argv[1:])}; flags look like --name=value.")
  tool = pathlib.Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "scoat_jax"
  for name in required:
    if not getattr(flags.FLAGS, name):
      fail(f"--{name} is required (python -m scoat_jax.{tool} --help).")
  from scoat_jax.common import host_memory, signals
  signals.terminate_as_interrupt()
  host_memory.keep_freed_memory()  # before JAX starts its threads
  try:
    if compilation_cache_dir is not None:
      from scoat_jax.common import compilation_cache
      compilation_cache.enable(compilation_cache_dir)
    call()
  except KeyboardInterrupt as e:
    logging.warning("interrupted: %s", _interrupted(tool, str(e)))
    sys.exit(EXIT_INTERRUPTED)
  except DivergedError as e:
    _traceback_if_verbose()
    fail(str(e), EXIT_DIVERGED)
  except (ValueError, OSError) as e:
    _traceback_if_verbose()
    fail(str(e))
  if show is not None:
    echo(pathlib.Path(show).expanduser().read_text(encoding="utf-8"))

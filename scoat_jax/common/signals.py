"""SIGTERM handled as Ctrl-C, and stretches of work that no signal cuts in two.

A command run by `common.cli` turns SIGTERM (what `kill`, Slurm and
container runtimes send) into the KeyboardInterrupt that Ctrl-C raises, so
both end the command the same way: exit status 130 after the command has
said what it finished. `held()` postpones both signals over a few file
writes that belong together (one scan's mask, SEG, key images and report);
a signal that came meanwhile raises KeyboardInterrupt as the block ends.
"""
from __future__ import annotations

import contextlib
import signal
import threading

_NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}


def name(signum: int) -> str:
  """'Ctrl-C (SIGINT)', 'SIGTERM' or 'signal N'."""
  return _NAMES.get(signum, f"signal {signum}")


def _raise_interrupt(signum, frame):
  del frame
  raise KeyboardInterrupt(f"stopped by {name(signum)}")


def _main_thread() -> bool:
  return threading.current_thread() is threading.main_thread()


def terminate_as_interrupt() -> None:
  """From now on SIGTERM raises KeyboardInterrupt, as Ctrl-C does (main thread only)."""
  if _main_thread():
    signal.signal(signal.SIGTERM, _raise_interrupt)


@contextlib.contextmanager
def held():
  """SIGINT and SIGTERM wait until the block ends, then raise KeyboardInterrupt.

  Outside the main thread (where Python cannot install handlers) the block
  runs as it is. An exception from the block itself goes first; the signal
  is then dropped.
  """
  if not _main_thread():
    yield
    return
  caught = []
  old = {}

  def hold(signum, frame):
    del frame
    caught.append(signum)

  for sig in (signal.SIGINT, signal.SIGTERM):
    old[sig] = signal.signal(sig, hold)
  try:
    yield
  finally:
    for sig, handler in old.items():
      signal.signal(sig, handler)
  if caught:
    raise KeyboardInterrupt(f"stopped by {name(caught[0])}")

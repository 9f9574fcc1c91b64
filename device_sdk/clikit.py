"""What every ``ecos-*`` command shares: typed errors become one line and an exit code."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import Callable, Optional, Sequence

from device_sdk.errors import EcosError, InputError

INTERRUPTED = 130


def add_trust_arguments(p: argparse.ArgumentParser, what: str, refused_before: str) -> None:
    """``--trusted-key``, ``--revoked-key`` and ``--accept-unsigned`` for a command that reads a signed ``what``."""
    p.add_argument(
        "--trusted-key",
        action="append",
        metavar="PUBLIC_KEY",
        help=f"the cloud's public key (PEM or 64 hex digits; repeat for several): the {what} must be signed "
        f"by one of them, else it is refused before {refused_before}. Without it the {what} is not verified "
        "(a warning says so)",
    )
    p.add_argument("--revoked-key", action="append", metavar="KEY_ID", help="a key id to refuse (repeatable)")
    p.add_argument(
        "--accept-unsigned",
        action="store_true",
        help=f"with --trusted-key: still answer a {what} that carries no signature (development only)",
    )


def run_cli(
    parser: argparse.ArgumentParser, argv: Optional[Sequence[str]], setup: Callable[[argparse.Namespace], None]
) -> int:
    """Parse ``argv``, run ``args.func(args)``; ``EcosError`` -> ``error[code]: message``."""
    args = parser.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # a file name that is not UTF-8 is printed as its bytes, as ls does
        sys.stdout.reconfigure(errors="surrogateescape")
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    setup(args)
    try:
        return int(args.func(args) or 0)
    except EcosError as err:
        print(f"error[{err.code}]: {err}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:  # the reader went away (``| head``): stop quietly, as other tools do
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1
    except ConnectionError as err:  # a broker or peer that refused or dropped us: not the user's input
        logging.getLogger("ecos").debug("traceback of the connection error", exc_info=True)
        print(f"error[connection]: {err.strerror or err}", file=sys.stderr)
        return 1
    except OSError as err:  # a path the command cannot read or write (a file where a folder goes, no room, ...)
        logging.getLogger("ecos").debug("traceback of the OS error", exc_info=True)
        path = err.filename2 or err.filename  # os.replace(tmp, out): the path given, not the temporary file
        where = f": {path}" if path else ""
        print(f"error[{InputError.code}]: {err.strerror or err}{where}", file=sys.stderr)
        return InputError.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED


OWN_LOGGERS = ("ecos", "cloud", "device_sdk", "models")


def _own_or_warning(record: logging.LogRecord) -> bool:
    """Our INFO lines, other libraries' warnings: their INFO chatter (the TFLite converter's, torch's) only with -v."""
    return record.levelno >= logging.WARNING or record.name.split(".", 1)[0] in OWN_LOGGERS


def whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``, else a usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


positive_int = whole_number(1)  # a batch size, a count


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    if not verbose:
        handler.addFilter(_own_or_warning)
    logging.basicConfig(
        level=level, handlers=[handler], format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")

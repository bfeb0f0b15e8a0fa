"""What every command-line tool shares: a configuration or input mistake is one line on stderr and
exit code 2, never a traceback. A path that cannot be read or written (OSError) is such a mistake."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from moe_train.config import ConfigError


def exit_on_config_error(error: ConfigError) -> None:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    try:
        yield
    except ConfigError as e:
        exit_on_config_error(e)
    except OSError as e:  # a path that does not exist, is not writable, is a file where a folder goes...
        where = f": {e.filename}" if e.filename else ""
        exit_on_config_error(ConfigError(f"{e.strerror or e}{where}"))

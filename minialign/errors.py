"""The ground floor: the errors a user can fix, and the one wrapper every command runs under.

A user error (bad data, a missing path, an unreadable or unsafe checkpoint, a reward field a prompt file lacks)
already carries a message that names the file, the line and what is wrong. `run_cli(main)`, the entry point of
every train_*.py script and every `python -m minialign...` command, prints that message as one line

    train_sft.py: error: bad.jsonl:2: malformed JSON (Expecting value: line 1 column 1 (char 0))

and exits with status 1, instead of a traceback through the loader. MINIALIGN_DEBUG=1 shows the traceback.
Every other exception is a bug of ours and keeps its traceback. Imports nothing else of minialign.
"""

from __future__ import annotations

import os
import sys


class UserError(Exception):
    """Base of the errors a user fixes by changing an input (minialign.data.formats.DataError, ...)."""


USER_ERRORS = (UserError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def run_cli(main, argv=None):
    """main(argv) with user errors as one line on stderr and exit status 1 (MINIALIGN_DEBUG=1: the traceback)."""
    try:
        return main(argv) if argv is not None else main()
    except USER_ERRORS as e:
        if os.environ.get("MINIALIGN_DEBUG", "") not in ("", "0"):
            raise
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] not in ("", "-c", "-m") else "minialign"
        if prog == "__main__.py" or prog.endswith(".py") and "minialign" in sys.argv[0].replace("\\", "/").split("/"):
            prog = "python -m " + (sys.modules["__main__"].__spec__.name if sys.modules["__main__"].__spec__ else prog)
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)

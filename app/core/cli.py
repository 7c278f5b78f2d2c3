"""What every entry point shares: the parser with its output flags, one error line and exit
code 2 for a known error, and interrupts.

SIGINT (Ctrl-C) or SIGTERM during any stage unwinds it: training workers are stopped, partial
outputs removed, the MLflow run marked ``KILLED``; then one line names the stage and how to
continue, and the process exits 130 (SIGINT) or 143 (SIGTERM).
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Callable, NoReturn, Optional

from app.core import logs
from app.core.config import add_arguments
from app.core.errors import KNOWN
from app.core.redact import redact

EXIT_ERROR = 2

# how to go on after an interrupt, per stage
CONTINUE = {
    "prepare": "nothing was published (a prepared dataset appears only when complete); run "
               "the same command again",
    "train": "the workers were stopped and no model folder was published; run the same "
             "command with --resume to continue from the last epoch checkpoint",
    "refit": "the workers were stopped and the refit model was not published (the evaluated "
             "model is complete); run the same command with --resume to reuse the evaluated "
             "run and refit again",
    "tune": "the trials were stopped; run the same command with --resume to continue the sweep",
    "infer": "no recommendations were published; run the same command again",
}
NOTHING = "nothing was published; run the same command again"
BETWEEN = ("what the finished stages published is kept; run the same command again to go on "
           "from there")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr and exit 2, as every other
    error of an entry point (argparse's own prints the usage first)."""

    def error(self, message: str) -> NoReturn:
        if message.endswith("expected one argument"):  # argparse reads -1e9 or -inf as a flag
            message += " (a value starting with '-' goes after '=', e.g. --rating-min=-1e9)"
        self.exit(EXIT_ERROR, f"error: {message} (see {self.prog} --help)\n")


def parser(prog: str, doc: Optional[str], sections: Optional[list[str]] = None, *,
           required: str = "") -> argparse.ArgumentParser:
    """An entry point's parser: its description, ``--quiet`` / ``--verbose``, and the config
    flags of ``sections`` (default: all), grouped by section. The entry point's own flags,
    added after, are listed first."""
    p = _Parser(prog=prog, description=doc,
                usage=f"{prog} {required + ' ' if required else ''}[options]",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    out = p.add_argument_group("output")
    level = out.add_mutually_exclusive_group()
    level.add_argument("--quiet", action="store_true",
                       help="print only errors and the final report")
    level.add_argument("--verbose", action="store_true",
                       help="also print what Ray, Ray Data, Ray Train, TorchRec and MLflow "
                            "say (by default it goes to Ray's log files only)")
    add_arguments(p, sections)
    return p


def main(p: argparse.ArgumentParser, body: Callable[[argparse.Namespace], None],
         argv: Optional[list[str]] = None) -> int:
    """Parse ``argv``, set up the output and the signal handlers, run ``body``; returns the
    exit code (0, 2 for a known error, 128 + the signal number when interrupted)."""
    args = p.parse_args(argv)
    logs.setup("quiet" if args.quiet else "verbose" if args.verbose else "normal")
    logs.install_signal_handlers()
    logs.reset_stages()
    try:
        body(args)
    except KNOWN as e:
        print(f"error: {redact(str(e))}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal ends it at once
            signal.signal(sig, signal.SIG_DFL)
        signum = logs.received_signal()
        stage = logs.current_stage()
        when = stage if stage.startswith("after ") else f"during {stage}"
        print(f"interrupted by {signal.Signals(signum).name} {when}: "
              f"{CONTINUE.get(stage, BETWEEN if stage.startswith('after ') else NOTHING)}",
              file=sys.stderr, flush=True)
        return 128 + signum
    return 0

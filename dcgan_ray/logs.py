"""Logging set-up shared by the CLI and the Ray workers: our INFO lines, libraries' warnings only."""

import logging
import sys
import warnings

FORMAT = "%(asctime)s %(levelname)s %(message)s"


class StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted, as logging's own last resort does: a
    handler that kept the stream it was made with would write to a closed one once that stream is replaced
    (pytest's capture of a test that ran the CLI, `contextlib.redirect_stderr`)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(verbose: bool = False) -> None:
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("dcgan_ray").setLevel(logging.DEBUG if verbose else logging.INFO)
    # Ray 2.60 deprecates broadcast_buffers but tells users who need rank-local buffers at init
    # (we do, see loop._average_bn_buffers) to keep it until init_sync_buffers exists.
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated")

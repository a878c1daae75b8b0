"""Logging set-up shared by the CLI and the Ray workers: our INFO lines, libraries' warnings only."""

import logging
import warnings


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", force=True
    )
    logging.getLogger("dcgan_ray").setLevel(logging.DEBUG if verbose else logging.INFO)
    # Ray 2.60 deprecates broadcast_buffers but tells users who need rank-local buffers at init
    # (we do, see loop._average_bn_buffers) to keep it until init_sync_buffers exists.
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated")

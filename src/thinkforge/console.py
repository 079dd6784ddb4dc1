"""A quiet console for the entry points: each log record printed once, no advertisements, no per-file bars."""

from __future__ import annotations

import logging


class _DropAdvertisements(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip:" not in record.getMessage()


def quiet_console() -> None:
    """Under Hydra, whose handler on the root logger prints every record with its time and source, Lightning's
    own console handlers would print each of its lines a second time; they go, and Lightning's records take the
    root's way. transformers' per-file loading and saving bars would cut through the training progress bar."""
    import transformers

    if logging.getLogger().hasHandlers():
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.propagate = True
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropAdvertisements())
    transformers.utils.logging.disable_progress_bar()

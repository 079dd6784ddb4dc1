"""thinkforge: a Lightning-based trainer that turns a pretrained causal LM into a reasoning model. From Python:
`thinkforge.train(*overrides)`, `thinkforge.pipeline(*overrides)`, `thinkforge.evaluate(*overrides)` take what
the command line takes (`thinkforge.api`)."""

from thinkforge.api import evaluate, pipeline, train

__all__ = ["evaluate", "pipeline", "train"]

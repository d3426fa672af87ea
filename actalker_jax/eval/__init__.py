"""Evaluation: control measurement on synthetic faces, video metrics on real data (see `actalker_jax.evaluate`)."""


class EvalError(ValueError):
    """A bad evaluation input; the message names the file, key or value."""

"""Build (parts of) the model from a config without memory or initialisation cost.

The start-up checks (``validate.py``, ``list_keys.py``) need the model the config describes (its
parameter names and shapes, the features its backbone produces) in the launcher, seconds before
any worker is spawned. Built under ``torch.device("meta")`` a model holds no memory and runs no
initialisation; a component that cannot be built there is built on the CPU instead.
"""

import contextlib
import logging
import warnings

import torch
from detectron2.modeling import build_model

__all__ = ["build_on", "first_line", "quiet"]


def build_on(cfg, device="meta", builder=build_model):
    """``builder(cfg)`` with ``MODEL.DEVICE`` and every new tensor on ``device``, logs silenced."""
    build_cfg = cfg.clone()
    build_cfg.defrost()
    build_cfg.MODEL.DEVICE = device
    with quiet(), torch.device(device):
        return builder(build_cfg)


@contextlib.contextmanager
def quiet():
    """Silence the builders' and loaders' logs and warnings (the launcher has no log file yet)."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def first_line(error):
    """The first line of an exception's message ("" if it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""

"""Shipped weights: where they are, their model cards, and loading them with their checksum checked.

Weights live in ``deblend/weights/<name>.pt`` with a model card ``<name>.json``
beside them (data recipe, training settings, hardware, metrics, sha256 of the
weights file). Nothing is ever downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["WEIGHTS_DIR", "DEFAULT_MASK_RCNN", "DEFAULT_PROB_UNET", "weights_path", "model_card", "load_mask_rcnn",
           "load_prob_unet"]

#: Folder of the shipped weights.
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
#: Name of the default Mask R-CNN weights.
DEFAULT_MASK_RCNN = "mask_rcnn_small"
#: Name of the default probabilistic U-Net weights (blend refinement).
DEFAULT_PROB_UNET = "prob_unet"


def weights_path(name_or_path):
    """Path of shipped weights ``name`` (``deblend/weights/<name>.pt``) or an explicit ``.pt`` path."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".pt":
        return candidate
    return WEIGHTS_DIR / f"{name_or_path}.pt"


def model_card(name_or_path):
    """The model card (dict) beside a weights file, or None when there is none."""
    card = weights_path(name_or_path).with_suffix(".json")
    if not card.exists():
        return None
    try:
        return json.loads(card.read_text())
    except (ValueError, UnicodeDecodeError) as exc:  # a corrupt card must not pass as "no checksum"
        raise ValueError(f"model card {card} is not valid JSON ({exc}); re-install the deblend package "
                         "to restore it, or remove it to load the weights without a checksum") from exc


def load_mask_rcnn(name_or_path=DEFAULT_MASK_RCNN, *, device="cpu"):
    """Load Mask R-CNN weights, checking the sha256 recorded in their model card.

    Parameters
    ----------
    name_or_path : str or os.PathLike, optional
        Shipped weights name or a ``.pt`` path.
    device : str, optional

    Returns
    -------
    model : torchvision.models.detection.MaskRCNN
        In eval mode; ``model.deblend_sha256`` identifies the weights.

    Raises
    ------
    FileNotFoundError
        If the weights file is missing (the message says how to get it).
    ValueError
        If the file's sha256 differs from its model card's.
    """
    from deblend.models.mask_rcnn import load_weights

    return _load_checked(load_weights, name_or_path, device)


def load_prob_unet(name_or_path=DEFAULT_PROB_UNET, *, device="cpu"):
    """Load probabilistic U-Net weights, checking the sha256 recorded in their model card.

    Parameters
    ----------
    name_or_path : str or os.PathLike, optional
        Shipped weights name or a ``.pt`` path.
    device : str, optional

    Returns
    -------
    deblend.models.prob_unet.ProbUNet
        In eval mode; ``model.deblend_sha256`` identifies the weights.
    """
    from deblend.models.prob_unet import load_prob_unet as load

    return _load_checked(load, name_or_path, device)


def _load_checked(load, name_or_path, device):
    """``load(path, device=..., expected_sha256=...)`` with the sha256 of the weights' model card."""
    path = weights_path(name_or_path)
    card = model_card(path)
    model = load(path, device=device, expected_sha256=card.get("sha256") if card else None)
    model.deblend_card = card or {}
    return model

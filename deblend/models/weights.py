"""Weights files of deblend's networks: one format, atomic writes, safe loads, checksums.

A weights file is a ``torch.save`` of ``{"format", "kind", "config",
"state_dict", "metadata"}`` made of plain types, so it loads with
``torch.load(..., weights_only=True)`` (no code runs on load). ``kind`` names
the network (``"mask_rcnn"``, ``"prob_unet"``), ``config`` the builder's
arguments. Floating-point tensors are stored as float16.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections import OrderedDict

import torch

__all__ = ["WEIGHTS_FORMAT", "sha256_file", "save_model", "load_payload"]

log = logging.getLogger(__name__)

#: Version of the file layout; files of a newer version are refused.
WEIGHTS_FORMAT = 1

_NAMES = {"mask_rcnn": "Mask R-CNN", "prob_unet": "probabilistic U-Net"}
_HOW_TO_GET = {
    "mask_rcnn": "train your own with pipelines/train_mask_rcnn.py",
    "prob_unet": "train your own with pipelines/train_prob_unet.py",
}


def how_to_get(kind):
    """What to tell a user whose weights of ``kind`` are missing or corrupt."""
    return ("re-install the deblend package to restore its shipped weights (deblend/weights/), or "
            + _HOW_TO_GET.get(kind, "train your own with the recipes in pipelines/"))


def sha256_file(path):
    """The sha256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _to_half(state_dict):
    """Cast float tensors to float16, keeping any that float16 cannot hold."""
    out = OrderedDict()
    for key, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            half = tensor.to(torch.float16)
            if bool(torch.isfinite(half).all()) or not bool(torch.isfinite(tensor).all()):
                tensor = half
            else:
                log.warning("%s overflows float16; stored as %s", key, tensor.dtype)
        out[key] = tensor.clone()
    return out


def save_model(model, path, *, kind, config, metadata):
    """Write a network's configuration and weights to ``path``, atomically.

    The file is written to a temporary name in the same directory, checked to
    load with ``weights_only=True``, and renamed over ``path``, so a reader
    never sees a partial file.

    Parameters
    ----------
    model : torch.nn.Module
    path : str or os.PathLike
        Destination (conventionally ``*.pt``); its directory must exist.
    kind : str
        Network name, checked at load.
    config : dict
        The builder's keyword arguments (plain types).
    metadata : dict
        Provenance (training data, recipe, metrics) made of plain Python types.

    Returns
    -------
    str
        The sha256 hex digest of the written file.

    Raises
    ------
    ValueError
        If ``metadata`` is not a dict of plain types.
    FileNotFoundError
        If the directory of ``path`` does not exist.
    """
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata must be a dict, got {type(metadata).__name__}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path}: directory {directory} does not exist")
    payload = {"format": WEIGHTS_FORMAT, "kind": kind, "config": dict(config),
               "state_dict": _to_half(model.state_dict()), "metadata": metadata}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            torch.load(tmp, map_location="cpu", weights_only=True)
        except Exception as error:  # the unpickler's errors have no common base
            raise ValueError(
                "metadata must hold only plain Python types (str, int, float, bool, None, "
                f"lists, tuples, dicts) so the file loads with weights_only=True: {error}"
            ) from error
        digest = sha256_file(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; weights are package data others read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    log.info("wrote %s weights %s (sha256 %s)", _NAMES.get(kind, kind), path, digest)
    return digest


def load_payload(path, *, kind, device="cpu", expected_sha256=None):
    """Read and check a weights file written by `save_model`.

    Parameters
    ----------
    path : str or os.PathLike
    kind : str
        Expected network name (files without one are Mask R-CNN files of
        deblend 0.1).
    device : str or torch.device, optional
        Checked to be usable (the payload itself is loaded on the CPU).
    expected_sha256 : str, optional
        If given, the file's sha256 must equal it.

    Returns
    -------
    payload : dict
        With ``config`` and a float32 ``state_dict``.
    digest : str
        The file's sha256.
    device : torch.device

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist (the message says how to get weights).
    ValueError
        If the sha256 does not match, the device is unusable, or the file is
        not a deblend weights file of ``kind``.
    """
    path = os.fspath(path)
    name = _NAMES.get(kind, kind)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name} weights file not found: {path}; {how_to_get(kind)}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be e.g. 'cpu' or 'cuda', got {device!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available; use 'cpu'")
    digest = sha256_file(path)
    if expected_sha256 is not None and digest != str(expected_sha256).strip().lower():
        raise ValueError(f"sha256 mismatch for {path}: expected {expected_sha256}, file has {digest}; "
                         f"the file is corrupt or not the expected version — {how_to_get(kind)}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle/zip errors have no common base
        raise ValueError(f"{path} is not a readable weights file: {error}") from error
    if not isinstance(payload, dict) or not {"config", "state_dict"} <= payload.keys():
        raise ValueError(f"{path} is not a deblend {name} weights file (expected a dict with 'config' and "
                         "'state_dict', as written by deblend.models.weights.save_model)")
    if payload.get("kind", "mask_rcnn") != kind:
        other = payload.get("kind", "mask_rcnn")
        raise ValueError(f"{path} holds {_NAMES.get(other, other)} weights, not {name} weights")
    if payload.get("format", WEIGHTS_FORMAT) > WEIGHTS_FORMAT:
        raise ValueError(f"{path} was written in weights format {payload['format']}, newer than this "
                         f"deblend reads ({WEIGHTS_FORMAT}); upgrade deblend")
    payload["state_dict"] = {k: v.float() if v.is_floating_point() else v
                             for k, v in payload["state_dict"].items()}
    return payload, digest, device

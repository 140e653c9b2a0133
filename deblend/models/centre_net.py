"""A full-resolution source-centre detector: a small U-Net predicting a centre heatmap.

Mask R-CNN decides whether a source is there from 7x7 features pooled at a
stride of 4 pixels or more, and proposes it from anchors every 4 pixels; a
faint companion two pixels from a brighter neighbour's peak is hard to see at
that resolution (README, *Where the blended sources are lost*). This network
looks at every pixel: it predicts, per pixel, the probability that a source's
centre lies there, trained like CenterNet (Zhou et al. 2019) with a
penalty-reduced focal loss on Gaussian bumps at the truth centres. Local
maxima of its heatmap are candidate sources (`find_centres`).

Numpy at the surface (`centre_heatmap`, `find_centres`, `centre_targets`),
torch inside (`CentreNet`, `centre_focal_loss`).
"""

import json
import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CENTRE_SIGMA",
    "CentreNet",
    "centre_focal_loss",
    "centre_heatmap",
    "centre_peaks",
    "centre_targets",
    "find_centres",
    "load_centre_net",
    "save_centre_net",
    "shift_operating_point",
]

log = logging.getLogger(__name__)

#: Gaussian sigma (pixels) of the training targets' bump around each centre: small, so
#: that companions 2-3 pixels apart stay two maxima.
CENTRE_SIGMA = 1.0


def _block(in_channels, out_channels):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class CentreNet(nn.Module):
    """U-Net from a normalised detection image to centre logits at every pixel.

    Parameters
    ----------
    in_channels : int, optional
        Input channels (1: the normalised detection image).
    channels : sequence of int, optional
        Channels per resolution, full resolution first; each further level
        halves the resolution.

    Notes
    -----
    ``forward`` takes ``(batch, in_channels, ny, nx)`` images of any size
    (padded internally to a multiple of ``2 ** (len(channels) - 1)``) and
    returns ``(batch, 1, ny, nx)`` logits. NaN pixels must be set (e.g. to 0)
    before.
    """

    def __init__(self, in_channels=1, channels=(16, 32, 64, 96)):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) < 2 or min(channels) < 1:
            raise ValueError(f"channels must hold at least two positive widths, got {channels!r}; "
                             "e.g. (16, 32, 64, 96)")
        self.config = {"in_channels": int(in_channels), "channels": list(channels)}
        self.down = nn.ModuleList([_block(in_channels, channels[0])]
                                  + [_block(a, b) for a, b in zip(channels[:-1], channels[1:], strict=True)])
        self.up = nn.ModuleList([_block(b + a, a) for a, b in zip(channels[:-1], channels[1:], strict=True)])
        self.head = nn.Conv2d(channels[0], 1, 1)
        nn.init.constant_(self.head.bias, -4.0)  # start near "no centre anywhere" (CenterNet's prior)

    def forward(self, x):
        """Centre logits ``(batch, 1, ny, nx)`` of ``(batch, in_channels, ny, nx)`` images."""
        ny, nx = x.shape[-2:]
        m = 2 ** (len(self.down) - 1)
        x = F.pad(x, (0, -nx % m, 0, -ny % m))
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for block, skip in zip(reversed(self.up), reversed(skips[:-1]), strict=True):
            x = block(torch.cat([F.interpolate(x, scale_factor=2.0, mode="nearest"), skip], dim=1))
        # The 1x1 head as an explicit weighted sum over channels: the convolution kernel's result depends on
        # the number of torch threads in its last bits, and outputs must not (deterministic catalogs).
        weight, bias = self.head.weight, self.head.bias
        logits = (x * weight.view(1, -1, 1, 1)).sum(dim=1, keepdim=True) + bias.view(1, 1, 1, 1)
        return logits[..., :ny, :nx]


def centre_targets(centres, shape, *, sigma=CENTRE_SIGMA):
    """Training heatmap: the maximum over sources of a Gaussian bump at each centre.

    Parameters
    ----------
    centres : array_like, shape (n, 2)
        ``(x, y)`` of each source, pixels (0-based, pixel centres at integers).
    shape : tuple of int
        ``(ny, nx)``.
    sigma : float, optional
        Bump sigma, pixels.

    Returns
    -------
    heatmap : ndarray of float32, shape (ny, nx)
        Exactly 1 at the pixel nearest each centre inside the image, smaller elsewhere.
    """
    ny, nx = shape
    heat = np.zeros((ny, nx), np.float32)
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    r = int(np.ceil(3 * sigma))
    for x, y in centres:
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        if not (0 <= ix < nx and 0 <= iy < ny):
            continue
        y0, y1, x0, x1 = max(iy - r, 0), min(iy + r + 1, ny), max(ix - r, 0), min(ix + r + 1, nx)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        bump = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)).astype(np.float32)
        bump[iy - y0, ix - x0] = 1.0
        np.maximum(heat[y0:y1, x0:x1], bump, out=heat[y0:y1, x0:x1])
    return heat


def centre_focal_loss(logits, targets, *, alpha=2.0, beta=4.0):
    """CenterNet's penalty-reduced pixelwise focal loss, averaged over the centres.

    Parameters
    ----------
    logits : Tensor, shape (batch, 1, ny, nx)
    targets : Tensor, shape (batch, 1, ny, nx)
        From `centre_targets`: 1 at centres.
    alpha, beta : float, optional
        Focusing exponent and the down-weighting of negatives near a centre.

    Returns
    -------
    Tensor
        Scalar loss.
    """
    logits = logits.float()
    pos = targets >= 1.0
    log_p = F.logsigmoid(logits)
    log_not_p = F.logsigmoid(-logits)
    p = log_p.exp()
    pos_loss = -(((1 - p) ** alpha) * log_p)[pos].sum()
    neg_loss = -(((1 - targets) ** beta) * (p**alpha) * log_not_p)[~pos].sum()
    return (pos_loss + neg_loss) / pos.sum().clamp(min=1)


def centre_heatmap(model, normalized, *, device="cpu"):
    """Centre probabilities of one normalised image (NaN read as 0).

    Parameters
    ----------
    model : CentreNet
    normalized : ndarray, shape (ny, nx)
        The normalised detection image (`deblend.preprocess.normalize`).
    device : str, optional

    Returns
    -------
    ndarray of float32, shape (ny, nx)
    """
    image = np.asarray(normalized, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"normalized must be a 2-D image, got shape {image.shape}")
    x = torch.from_numpy(np.nan_to_num(image, nan=0.0))[None, None].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            prob = torch.sigmoid(model(x))[0, 0]
    finally:
        model.train(was_training)
    out = prob.cpu().numpy()
    out[~np.isfinite(image)] = 0.0
    return out


def centre_peaks(heat, *, threshold, max_centres=None, window=3):
    """Local maxima of a batch of centre heatmaps (torch), highest first.

    Parameters
    ----------
    heat : Tensor, shape (batch, ny, nx)
        Centre probabilities.
    threshold : float
        Lowest probability of a centre.
    max_centres : int, optional
        Centres kept per image (the highest); None keeps all.
    window : int, optional
        Odd side of the neighbourhood a centre is the maximum of.

    Returns
    -------
    list of (xs, ys, values)
        Per image: long pixel coordinates and the heatmap values, as tensors.
    """
    if not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd integer, got {window!r}")
    is_max = heat == F.max_pool2d(heat[:, None], window, stride=1, padding=window // 2)[:, 0]
    out = []
    for b in range(heat.shape[0]):
        ys, xs = torch.nonzero(is_max[b] & (heat[b] >= threshold), as_tuple=True)
        values = heat[b, ys, xs]
        order = torch.argsort(values, descending=True)[:max_centres]
        out.append((xs[order], ys[order], values[order]))
    return out


def find_centres(heatmap, *, threshold=0.3, window=3):
    """Local maxima of a centre heatmap above ``threshold``.

    Parameters
    ----------
    heatmap : ndarray, shape (ny, nx)
        Centre probabilities (`centre_heatmap`).
    threshold : float, optional
        Lowest probability of a centre.
    window : int, optional
        Odd side of the neighbourhood a centre is the maximum of.

    Returns
    -------
    x, y, value : ndarray
        Pixel coordinates and heatmap values of the centres, highest first.
    """
    heat = torch.as_tensor(np.asarray(heatmap, dtype=np.float32))[None]
    ((xs, ys, values),) = centre_peaks(heat, threshold=threshold, window=window)
    return xs.numpy(), ys.numpy(), values.numpy()


def shift_operating_point(model, value):
    """Shift a `CentreNet`'s output so that heatmap value ``value`` reads 0.5 (in place).

    The head's bias is lowered by ``logit(value)``: the order of the heatmap
    values is unchanged, and a score threshold of 0.5 (deblend's default)
    then keeps the centres the unshifted network scored ``value`` or more.

    Parameters
    ----------
    model : CentreNet
    value : float
        In (0, 1).

    Returns
    -------
    CentreNet
        ``model``.
    """
    if not (isinstance(value, (int, float)) and 0 < value < 1):
        raise ValueError(f"value must be a heatmap value in (0, 1), got {value!r}; e.g. 0.4")
    with torch.no_grad():
        model.head.bias -= float(np.log(value / (1 - value)))
    return model


def save_centre_net(model, path, *, card):
    """Write a trained `CentreNet` (float16 weights) and its card to ``path``.

    Parameters
    ----------
    model : CentreNet
    path : str or os.PathLike
    card : dict
        Provenance (data, recipe, hardware) of plain Python types; the
        architecture is added under ``"architecture"``.
    """
    try:  # plain types only, so that weights_only loading reads it (torch.__version__ is not a str)
        card = json.loads(json.dumps({**card, "architecture": {"class": "deblend.models.centre_net.CentreNet",
                                                               **model.config}}, default=str))
    except (TypeError, ValueError) as error:
        raise ValueError(f"card must be a dict of plain types (str, numbers, lists, dicts): {error}") from error
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "card": card}, path)


def load_centre_net(path):
    """A `CentreNet` in eval mode from a file written by `save_centre_net`.

    Its card is ``model.deblend_card``.
    """
    payload = torch.load(path, map_location="cpu", weights_only=True)
    try:
        arch = payload["card"]["architecture"]
        model = CentreNet(in_channels=arch["in_channels"], channels=arch["channels"])
        model.load_state_dict({k: v.float() if v.is_floating_point() else v
                               for k, v in payload["state_dict"].items()})
    except (KeyError, TypeError, RuntimeError) as error:
        raise ValueError(f"{path} is not a centre detector written by save_centre_net "
                         f"(pipelines/train_centre_net.py): {error}") from error
    model.deblend_card = payload["card"]
    return model.eval()

"""Compact Mask R-CNN for astronomical detection images, and its weights files.

The network is torchvision's :class:`~torchvision.models.detection.MaskRCNN` with
the parts that do not suit astronomy replaced:

- one input channel (the normalised detection image, asinh(S/N)) and no ImageNet
  statistics (mean 0, std 1);
- no internal resizing: tiles go through at their own size, so boxes and masks
  come back in the tile's pixel grid;
- a compact backbone trained from scratch with ordinary (trainable) batch norm;
- small anchors (4-64 px) for sources a few pixels wide, and detection limits
  suited to crowded fields.

Weights files are written by :func:`save_weights` and read by :func:`load_weights`:
a dict ``{"config", "state_dict", "metadata"}`` saved with :func:`torch.save`, the
floating-point tensors stored in half precision, readable with
``torch.load(..., weights_only=True)``.
"""

import logging
import math
from collections import OrderedDict
from numbers import Integral, Real

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models import resnet18
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.models.resnet import BasicBlock
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from torchvision.ops.poolers import LevelMapper

from deblend.models.centre_net import CentreNet, centre_peaks
from deblend.models.roi_align import SeparableMultiScaleRoIAlign
from deblend.models.weights import load_payload, save_model

__all__ = [
    "CLASS_NAMES",
    "BACKBONES",
    "build_mask_rcnn",
    "model_config",
    "with_mask_head",
    "set_test_proposals",
    "set_peak_proposals",
    "peak_boxes",
    "attach_centre_net",
    "centre_boxes",
    "save_weights",
    "load_weights",
    "count_parameters",
]

logger = logging.getLogger(__name__)

#: Class index -> name; index 0 is torchvision's background class.
CLASS_NAMES = ("background", "star", "galaxy")

#: Backbones :func:`build_mask_rcnn` can build.
BACKBONES = ("small", "resnet18")

# Per-backbone defaults for the parts whose size is a speed/capacity trade-off.
_PRESETS = {
    "small": {"fpn_channels": 96, "box_representation_size": 256, "mask_head_channels": (64, 64)},
    "resnet18": {
        "fpn_channels": 128,
        "box_representation_size": 256,
        "mask_head_channels": (128, 128),
    },
}

# Both backbones return four maps at strides 4, 8, 16, 32; the FPN adds a
# subsampled fifth ("pool", stride 64) used by the RPN only.
_FEATURE_STRIDES = (4, 8, 16, 32)
_N_LEVELS = len(_FEATURE_STRIDES) + 1
# Padding the batch to a multiple of the coarsest stride keeps every level's
# grid an exact fraction of the padded image, so anchor strides are exact.
_SIZE_DIVISIBLE = 2 * _FEATURE_STRIDES[-1]
# Backbone units from the top, as counted by ``trainable_backbone_layers``.
_BACKBONE_UNITS = ("layer4", "layer3", "layer2", "layer1", "stem")



class _NoResizeTransform(GeneralizedRCNNTransform):
    """Normalise and batch images without ever rescaling them.

    torchvision's transform rescales every image so its short side equals
    ``min_size`` (capped by ``max_size``), in training *and* in evaluation (its
    ``_skip_resize`` flag only acts in training).  Tiles of the detection image
    must keep their pixel grid, so ``resize`` is the identity; ``postprocess``
    then maps boxes with a ratio of exactly 1 and pastes masks at the input size.
    """

    def __init__(self, in_channels, size_divisible):
        # min_size/max_size are never used; they only satisfy the parent.
        super().__init__(
            min_size=1,
            max_size=1,
            image_mean=[0.0] * in_channels,
            image_std=[1.0] * in_channels,
            size_divisible=size_divisible,
        )

    def normalize(self, image):
        """Check the channel count; mean 0 / std 1 needs no arithmetic."""
        if not image.is_floating_point():
            raise TypeError(f"images must be floating point, got dtype {image.dtype}")
        if image.shape[0] != len(self.image_mean):
            raise ValueError(
                f"images must have shape ({len(self.image_mean)}, H, W), got "
                f"{tuple(image.shape)}; pass the normalised detection image with a "
                "leading channel axis"
            )
        return image

    def resize(self, image, target=None):
        """Return the image and target unchanged (no rescaling)."""
        return image, target

    def postprocess(self, result, image_shapes, original_image_sizes):
        """Paste each mask into its image; boxes need no mapping (scale is 1)."""
        if self.training:
            return result
        for prediction, size in zip(result, original_image_sizes, strict=True):
            if "masks" in prediction:
                prediction["masks"] = _paste_masks(prediction["masks"], prediction["boxes"], size)
        return result

    def __repr__(self):
        return (
            f"{self.__class__.__name__}(no normalisation (mean 0, std 1), no resizing, "
            f"pad to a multiple of {self.size_divisible})"
        )


def paste_mask_crops(masks, boxes, window_shape):
    """Resample (N, 1, M, M) box-relative masks onto the pixels of their boxes.

    The inverse of how the training targets are made. torchvision's
    ``project_masks_on_boxes`` samples a footprint with
    ``roi_align(..., aligned=False)`` over its box ``(x0, y0, x1, y1)`` (for
    deblend, `deblend.training` boxes run from a footprint's first pixel index
    to its last + 1), so cell ``j`` of ``M`` holds the footprint at pixel
    coordinate ``x0 + (j + 0.5) * (x1 - x0) / M``, pixel centres at integers.
    Pixel ``p`` therefore reads cell ``(p - x0) * M / (x1 - x0) - 0.5``,
    interpolated bilinearly (``grid_sample``, ``align_corners=False``, the
    outer cells extended), and likewise in y. Beyond the box the value falls
    linearly to zero over one pixel, as the targets' own bilinear sampling of a
    footprint does between its last pixel and the next.

    torchvision's ``paste_masks_in_image`` instead resizes a one-cell padded
    mask onto the integer-truncated grown box, which moves masks by about half a
    pixel to smaller coordinates on average: a large loss of IoU for footprints
    a few pixels wide.

    Parameters
    ----------
    masks : torch.Tensor, shape (N, 1, M, M)
        Mask probabilities in box coordinates.
    boxes : torch.Tensor, shape (N, 4)
        ``(x0, y0, x1, y1)`` in window pixels.
    window_shape : tuple of int
        ``(height, width)`` of the window the crops are cut to.

    Returns
    -------
    list of tuple
        ``(crop, y0, x0)`` per mask: ``crop`` a float tensor covering every
        window pixel the mask can reach (empty when the box misses the window),
        ``(y0, x0)`` its first pixel.
    """
    height, width = (int(s) for s in window_shape)
    n = len(boxes)
    if n == 0:
        return []
    x0, y0 = boxes[:, 0], boxes[:, 1]
    span_x = (boxes[:, 2] - x0).clamp(min=1.0)  # as roi_align(aligned=False)
    span_y = (boxes[:, 3] - y0).clamp(min=1.0)
    # Non-zero within one pixel of the box: p in (x0 - 1, x0 + span + 1).
    xa = x0.floor().clamp(min=0).long()
    xb = ((x0 + span_x).ceil().long() + 1).clamp(max=width)
    ya = y0.floor().clamp(min=0).long()
    yb = ((y0 + span_y).ceil().long() + 1).clamp(max=height)
    sizes_y, sizes_x = (yb - ya).clamp(min=0), (xb - xa).clamp(min=0)
    # Masks are resampled in groups of similar crop size, each in one grid_sample call.
    extent = torch.maximum(sizes_y, sizes_x)
    bucket = torch.bucketize(extent, torch.tensor(_PASTE_BUCKETS, device=extent.device))
    crops = [None] * n
    for b in torch.unique(bucket).tolist():
        index = torch.nonzero(bucket == b).flatten()
        ky = int(sizes_y[index].max())
        kx = int(sizes_x[index].max())
        sampled = None
        if ky and kx:  # else every box of the group misses the window
            px = xa[index, None].to(masks.dtype) + torch.arange(kx, dtype=masks.dtype, device=masks.device)
            py = ya[index, None].to(masks.dtype) + torch.arange(ky, dtype=masks.dtype, device=masks.device)
            bx0, by0 = x0[index, None], y0[index, None]
            sx, sy = span_x[index, None], span_y[index, None]
            gx = ((px - bx0) * (2.0 / sx) - 1.0)[:, None, :].expand(-1, ky, -1)
            gy = ((py - by0) * (2.0 / sy) - 1.0)[:, :, None].expand(-1, -1, kx)
            sampled = nn.functional.grid_sample(masks[index], torch.stack((gx, gy), dim=-1), mode="bilinear",
                                                padding_mode="border", align_corners=False)[:, 0]
            fade_x = (1.0 - torch.maximum(bx0 - px, px - (bx0 + sx)).clamp(min=0.0)).clamp(min=0.0)
            fade_y = (1.0 - torch.maximum(by0 - py, py - (by0 + sy)).clamp(min=0.0)).clamp(min=0.0)
            sampled = sampled * fade_y[:, :, None] * fade_x[:, None, :]
        for j, i in enumerate(index.tolist()):
            h, w = int(sizes_y[i]), int(sizes_x[i])
            if h == 0 or w == 0:
                crops[i] = (masks.new_zeros((0, 0)), min(int(ya[i]), height), min(int(xa[i]), width))
            else:
                crops[i] = (sampled[j, :h, :w], int(ya[i]), int(xa[i]))
    return crops


# Crop sizes (pixels) by which `paste_mask_crops` groups masks; larger ones form one group.
_PASTE_BUCKETS = (8, 16, 32, 64)


def _paste_masks(masks, boxes, image_size):
    """Paste (N, 1, M, M) box-relative masks into (N, 1, H, W) image masks (`paste_mask_crops`)."""
    height, width = (int(s) for s in image_size)
    out = masks.new_zeros((masks.shape[0], 1, height, width))
    for index, (crop, y0, x0) in enumerate(paste_mask_crops(masks, boxes, (height, width))):
        out[index, 0, y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
    return out


# Input cells per matrix product in `_MaskPredictor` (hidden layer: 1024 x 4 x 64 floats, 1 MB).
_PREDICTOR_CHUNK = 1024


class _MaskPredictor(MaskRCNNPredictor):
    """torchvision's ``MaskRCNNPredictor``, evaluated without the 28x28 feature map's copies.

    The predictor is a 2x2, stride-2 transposed convolution, a ReLU and a 1x1
    convolution to the class logits. With kernel = stride = 2 the transposed
    convolution's output cells do not overlap (cell ``(2i + a, 2j + b)`` of
    channel ``o`` is ``bias[o] + sum_c x[c, i, j] * weight[c, o, a, b]``), so
    the three layers are two matrix products over channels per input cell,
    and only the small logit map is rearranged into 28x28. Same parameters
    and state-dict keys. Used at inference (no autograd); training runs the
    layers one by one. Under autocast the products run in the precision of
    the input (float16 with ``half=True``), as the layers would.
    """

    def forward(self, x):
        up = self.conv5_mask
        if (torch.is_grad_enabled() or up.kernel_size != (2, 2) or up.stride != (2, 2)
                or up.padding != (0, 0) or up.groups != 1):
            return super().forward(x)  # training: layer by layer
        with torch.autocast(x.device.type, enabled=False):  # in x's precision, as autocast would
            return self._fused(x)

    def _fused(self, x):
        up, out = self.conv5_mask, self.mask_fcn_logits
        n, channels, height, width = x.shape
        # (C_in, 2 * 2 * hidden), hidden fastest
        weight = up.weight.permute(0, 2, 3, 1).reshape(channels, -1).to(x.dtype)
        classes = out.weight.reshape(out.out_channels, -1).t().to(x.dtype)
        cells = x.permute(0, 2, 3, 1).reshape(-1, channels)
        logits = x.new_empty((cells.shape[0] * 4, out.out_channels))
        # In chunks of cells, so the hidden layer stays in cache and is never a large new buffer.
        for start in range(0, cells.shape[0], _PREDICTOR_CHUNK):
            hidden = (cells[start : start + _PREDICTOR_CHUNK] @ weight).view(-1, up.out_channels)
            if up.bias is not None:
                hidden += up.bias.to(x.dtype)
            torch.mm(hidden.relu_(), classes, out=logits[4 * start : 4 * (start + _PREDICTOR_CHUNK)])
        if out.bias is not None:
            logits += out.bias.to(x.dtype)
        logits = logits.view(n, height, width, 2, 2, out.out_channels).permute(0, 5, 1, 3, 2, 4)
        return logits.reshape(n, out.out_channels, 2 * height, 2 * width)


class _SmallResNet(nn.Module):
    """A small ResNet-like CNN: stem at stride 2, then four stages of BasicBlocks.

    Returns the outputs of ``layer1``..``layer4`` (strides 4, 8, 16, 32) as an
    ordered dict keyed "0".."3", like torchvision's ``IntermediateLayerGetter``.
    """

    def __init__(self, in_channels, channels=(32, 64, 128, 256), blocks=(2, 2, 2, 1)):
        super().__init__()
        stem_channels = channels[0] // 2
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_channels, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(stem_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem_channels, channels[0], 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU(inplace=True),
        )
        previous = channels[0]
        for index, (width, n_blocks) in enumerate(zip(channels, blocks, strict=True), start=1):
            setattr(self, f"layer{index}", _stage(previous, width, n_blocks))
            previous = width
        self.out_channels_list = list(channels)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Zero-initialise the last BN of each residual branch: every block
        # starts as the identity, which helps training from scratch.
        for module in self.modules():
            if isinstance(module, BasicBlock):
                nn.init.zeros_(module.bn2.weight)

    def forward(self, x):
        """Return the four stage outputs keyed "0".."3"."""
        x = self.stem(x)
        out = OrderedDict()
        for index in range(4):
            x = getattr(self, f"layer{index + 1}")(x)
            out[str(index)] = x
        return out


def _stage(in_channels, out_channels, n_blocks):
    """Return ``n_blocks`` BasicBlocks, the first downsampling by 2."""
    downsample = nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False),
        nn.BatchNorm2d(out_channels),
    )
    layers = [BasicBlock(in_channels, out_channels, stride=2, downsample=downsample)]
    layers += [BasicBlock(out_channels, out_channels) for _ in range(n_blocks - 1)]
    return nn.Sequential(*layers)


class _BackboneWithFPN(nn.Module):
    """A body returning four maps, an FPN on top, and optional frozen units.

    Frozen units have ``requires_grad=False`` and their batch-norm layers stay in
    eval mode (running statistics fixed) even when the model trains.
    """

    def __init__(self, body, in_channels_list, out_channels, frozen_prefixes):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            in_channels_list=in_channels_list,
            out_channels=out_channels,
            extra_blocks=LastLevelMaxPool(),
            norm_layer=nn.BatchNorm2d,
        )
        self.out_channels = out_channels
        self._frozen_prefixes = tuple(frozen_prefixes)
        for name, parameter in self.body.named_parameters():
            if name.startswith(self._frozen_prefixes):
                parameter.requires_grad_(False)

    def train(self, mode=True):
        """Set training mode, keeping the batch norm of frozen units in eval mode."""
        super().train(mode)
        if mode and self._frozen_prefixes:
            for name, module in self.body.named_modules():
                if name.startswith(self._frozen_prefixes) and isinstance(
                    module, nn.modules.batchnorm._BatchNorm
                ):
                    module.eval()
        return self

    def forward(self, x):
        """Return the FPN maps "0".."3" and "pool"."""
        return self.fpn(self.body(x))


def _frozen_prefixes(backbone, trainable_backbone_layers):
    """Parameter-name prefixes of the backbone units that are not trained."""
    frozen_units = _BACKBONE_UNITS[trainable_backbone_layers:]
    prefixes = []
    for unit in frozen_units:
        if unit == "stem" and backbone == "resnet18":
            prefixes += ["conv1.", "bn1."]
        else:
            prefixes.append(unit + ".")
    return prefixes


def _build_backbone(backbone, in_channels, fpn_channels, trainable_backbone_layers):
    """Return the body + FPN for ``backbone``."""
    if backbone == "resnet18":
        net = resnet18(weights=None, norm_layer=nn.BatchNorm2d, zero_init_residual=True)
        # One input channel: the normalised detection image.
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        body = IntermediateLayerGetter(
            net, return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
        )
        in_channels_list = [64, 128, 256, 512]
    else:
        body = _SmallResNet(in_channels)
        in_channels_list = body.out_channels_list
    frozen = _frozen_prefixes(backbone, trainable_backbone_layers)
    return _BackboneWithFPN(body, in_channels_list, fpn_channels, frozen)


def _roi_pool(output_size):
    """RoIAlign over the four FPN maps with their scales fixed up front.

    torchvision infers each level's scale on the *first* call, from the feature
    size over the largest unpadded image size, rounded to a power of two, and
    caches it.  Without resizing, padding can make that ratio round to the wrong
    power of two (a 40-px-high tile padded to 64 gives 16/40 -> 1/2, not 1/4),
    and the first batch would fix it for the model's lifetime.  The strides are
    known, so they are set here. The pooling itself is `roi_align`'s batched
    matrix products (`deblend.models.roi_align`), which use every core where
    torchvision's CPU kernel uses one, and equal it up to float rounding.
    """
    pool = SeparableMultiScaleRoIAlign(
        featmap_names=[str(i) for i in range(len(_FEATURE_STRIDES))],
        output_size=output_size,
        sampling_ratio=2,
    )
    pool.scales = [1.0 / stride for stride in _FEATURE_STRIDES]
    pool.map_levels = LevelMapper(
        k_min=int(math.log2(_FEATURE_STRIDES[0])), k_max=int(math.log2(_FEATURE_STRIDES[-1]))
    )
    return pool


def _is_int(value):
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value):
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(name, value, minimum, hint=""):
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}{hint}")
    return int(value)


def _check_fraction(name, value, *, closed_low=True, hint=""):
    in_range = _is_real(value) and (value >= 0 if closed_low else value > 0) and value <= 1
    if not in_range:
        interval = "[0, 1]" if closed_low else "(0, 1]"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}{hint}")
    return float(value)


def _normalise_anchor_sizes(anchor_sizes):
    """Return anchor sizes as one tuple of floats-or-ints per pyramid level."""
    hint = (
        f"; give {_N_LEVELS} positive sizes in pixels, one per pyramid level "
        "(strides 4, 8, 16, 32, 64), e.g. (4, 8, 16, 32, 64), or one tuple of sizes per level"
    )
    if not isinstance(anchor_sizes, (tuple, list)) or len(anchor_sizes) != _N_LEVELS:
        raise ValueError(f"anchor_sizes must have {_N_LEVELS} entries, got {anchor_sizes!r}{hint}")
    levels = []
    for level in anchor_sizes:
        sizes = tuple(level) if isinstance(level, (tuple, list)) else (level,)
        if not sizes or not all(_is_real(s) and s > 0 for s in sizes):
            raise ValueError(f"anchor_sizes has an invalid entry {level!r}{hint}")
        levels.append(tuple(int(s) if float(s).is_integer() else float(s) for s in sizes))
    if len({len(sizes) for sizes in levels}) != 1:
        raise ValueError(
            f"anchor_sizes must give the same number of sizes at every level, got "
            f"{anchor_sizes!r} (the RPN head predicts a fixed number of anchors per location)"
        )
    return tuple(levels)


def build_mask_rcnn(
    *,
    backbone="small",
    num_classes=3,
    in_channels=1,
    anchor_sizes=(4, 8, 16, 32, 64),
    aspect_ratios=(0.5, 1.0, 2.0),
    fpn_channels=None,
    box_representation_size=None,
    mask_head_channels=None,
    box_nms_thresh=0.6,
    box_score_thresh=0.05,
    box_detections_per_img=300,
    rpn_pre_nms_top_n_train=1000,
    rpn_post_nms_top_n_train=500,
    rpn_pre_nms_top_n_test=600,
    rpn_post_nms_top_n_test=300,
    peak_proposals=0,
    contrast_peak_proposals=0,
    centre_net_channels=None,
    centre_proposals=0,
    centre_threshold=0.3,
    centre_detect=False,
    trainable_backbone_layers=5,
    seed=None,
):
    """Build a compact Mask R-CNN for single-channel astronomical tiles.

    The model takes float32 tensors of shape ``(in_channels, H, W)`` holding the
    normalised detection image (asinh(S/N), roughly -3..10), never rescales them
    and pads a batch with zeros (sky) to a multiple of 64 pixels; tile sizes
    that are multiples of 64 waste nothing.  In training mode it returns a dict
    of losses; in eval mode a list of dicts with ``boxes`` (N, 4) x1, y1, x2, y2
    in input pixels, ``labels`` (N,) indices into :data:`CLASS_NAMES`, ``scores``
    (N,) and ``masks`` (N, 1, H, W) soft in 0-1.

    Parameters
    ----------
    backbone : {"small", "resnet18"}, optional
        ``"small"`` (default): a ResNet-like CNN with 32/64/128/256 channels
        (3.5 M parameters in all, 2-2.5x faster than ``"resnet18"`` on CPU).
        ``"resnet18"``: torchvision's ResNet-18, random init (14.1 M in all).  Both
        feed an FPN at strides 4, 8, 16, 32 (+ 64 for the RPN).
    num_classes : int, optional
        Number of classes including background; default 3 (:data:`CLASS_NAMES`).
    in_channels : int, optional
        Input channels; 1 for the detection image.
    anchor_sizes : sequence, optional
        Anchor sizes in pixels, one per pyramid level (strides 4, 8, 16, 32,
        64), or one tuple of sizes per level.
    aspect_ratios : sequence of float, optional
        Anchor aspect ratios (height / width), the same at every level.
    fpn_channels : int, optional
        FPN width; default 96 (``"small"``) or 128 (``"resnet18"``).
    box_representation_size : int, optional
        Width of the two-layer box head; default 256.
    mask_head_channels : sequence of int, optional
        Channels of each 3x3 conv of the mask head; default (64, 64)
        (``"small"``) or (128, 128) (``"resnet18"``).
    box_nms_thresh : float, optional
        IoU above which a lower-scoring box of the same class is suppressed.
        Above torchvision's 0.5 so close blends survive; tune it on blends.
    box_score_thresh : float, optional
        Detections scoring below this are dropped (eval mode).
    box_detections_per_img : int, optional
        Most detections kept per image (crowded tiles need many).
    rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test : int, optional
        Proposals kept per pyramid level before the RPN's NMS.
    rpn_post_nms_top_n_train, rpn_post_nms_top_n_test : int, optional
        Proposals kept per image after the RPN's NMS.
    peak_proposals : int, optional
        At inference, also give the box head boxes around up to this many of
        the brightest local maxima of each (smoothed) input window (see
        :func:`peak_boxes`), for close companions the RPN does not propose;
        0 (default) adds none. Training is unaffected.
    contrast_peak_proposals : int, optional
        Likewise, boxes around up to this many maxima of the local contrast
        (:func:`peak_boxes`' ``max_contrast_peaks``): companions on a brighter
        neighbour's slope, with no maximum of their own. 0 (default) adds none.
    centre_net_channels : sequence of int, optional
        Give the model a centre detector, ``model.centre_net``
        (`deblend.models.centre_net.CentreNet` with these widths), trained
        separately (``pipelines/train_centre_net.py``) and attached with
        :func:`attach_centre_net`. None (default): no centre detector.
    centre_proposals : int, optional
        At inference, boxes around up to this many maxima of the centre
        detector's heatmap per window join the proposals (as peak boxes do);
        0 (default) adds none.
    centre_threshold : float, optional
        Lowest heatmap value of a centre that gets proposals.
    centre_detect : bool, optional
        The centres alone decide what is a source: the detections are the
        heatmap maxima scoring at least the caller's score threshold, with
        ``det_score`` their heatmap value, and box, class and mask from the
        box head's detection of the same source or, with none, from the
        heads given the centre's proposals (``deblend.segment``). False
        (default): the box head decides, the centres only add proposals.
    trainable_backbone_layers : int, optional
        How many backbone units, counted from the top (layer4, layer3, layer2,
        layer1, stem), are trained; the rest are frozen (parameters and
        batch-norm statistics).  5 (default) trains everything, as training
        from scratch needs.
    seed : int, optional
        Seed for the random initialisation; None uses torch's global generator.
        The global generator's state is left untouched when a seed is given.

    Returns
    -------
    torchvision.models.detection.MaskRCNN
        The model in training mode, on the CPU, with the resolved builder
        arguments in ``model.deblend_config`` (see :func:`model_config`).

    Raises
    ------
    ValueError
        If an argument is invalid; the message names it and its value.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    num_classes = _check_int(
        "num_classes", num_classes, 2, hint=" (background counts as a class; default 3)"
    )
    in_channels = _check_int("in_channels", in_channels, 1)
    anchor_sizes = _normalise_anchor_sizes(anchor_sizes)
    if (
        not isinstance(aspect_ratios, (tuple, list))
        or not aspect_ratios
        or not all(_is_real(r) and r > 0 for r in aspect_ratios)
    ):
        raise ValueError(
            f"aspect_ratios must be a non-empty sequence of positive numbers, got "
            f"{aspect_ratios!r}, e.g. (0.5, 1.0, 2.0)"
        )
    aspect_ratios = tuple(float(r) for r in aspect_ratios)

    preset = _PRESETS[backbone]
    if fpn_channels is None:
        fpn_channels = preset["fpn_channels"]
    fpn_channels = _check_int("fpn_channels", fpn_channels, 8)
    if box_representation_size is None:
        box_representation_size = preset["box_representation_size"]
    box_representation_size = _check_int("box_representation_size", box_representation_size, 8)
    if mask_head_channels is None:
        mask_head_channels = preset["mask_head_channels"]
    if (
        not isinstance(mask_head_channels, (tuple, list))
        or not mask_head_channels
        or not all(_is_int(c) and c >= 8 for c in mask_head_channels)
    ):
        raise ValueError(
            f"mask_head_channels must be a non-empty sequence of integers >= 8, got "
            f"{mask_head_channels!r}, e.g. (128, 128)"
        )
    mask_head_channels = tuple(int(c) for c in mask_head_channels)

    box_nms_thresh = _check_fraction(
        "box_nms_thresh", box_nms_thresh, closed_low=False, hint=" (an IoU, e.g. 0.6)"
    )
    box_score_thresh = _check_fraction(
        "box_score_thresh", box_score_thresh, hint=" (a score, e.g. 0.05)"
    )
    box_detections_per_img = _check_int("box_detections_per_img", box_detections_per_img, 1)
    rpn = {}
    for name, value in (
        ("rpn_pre_nms_top_n_train", rpn_pre_nms_top_n_train),
        ("rpn_post_nms_top_n_train", rpn_post_nms_top_n_train),
        ("rpn_pre_nms_top_n_test", rpn_pre_nms_top_n_test),
        ("rpn_post_nms_top_n_test", rpn_post_nms_top_n_test),
    ):
        rpn[name] = _check_int(name, value, 1)
    peak_proposals = _check_int("peak_proposals", peak_proposals, 0)
    contrast_peak_proposals = _check_int("contrast_peak_proposals", contrast_peak_proposals, 0)
    if centre_net_channels is not None:
        if (not isinstance(centre_net_channels, (tuple, list)) or len(centre_net_channels) < 2
                or not all(_is_int(c) and c >= 1 for c in centre_net_channels)):
            raise ValueError(f"centre_net_channels must be None or a sequence of at least two positive "
                             f"integers, got {centre_net_channels!r}, e.g. (16, 32, 64, 96)")
        centre_net_channels = tuple(int(c) for c in centre_net_channels)
    centre_proposals = _check_int("centre_proposals", centre_proposals, 0)
    if centre_proposals and centre_net_channels is None:
        raise ValueError(f"centre_proposals={centre_proposals} needs a centre detector; pass "
                         "centre_net_channels (or attach one with attach_centre_net)")
    centre_threshold = _check_fraction("centre_threshold", centre_threshold, closed_low=False,
                                       hint=" (a heatmap value, e.g. 0.3)")
    if centre_detect and not centre_proposals:
        raise ValueError("centre_detect=True needs centre_proposals > 0 (the centres it detects); "
                         "e.g. centre_proposals=200")
    centre_detect = bool(centre_detect)
    if not _is_int(trainable_backbone_layers) or not 0 <= trainable_backbone_layers <= 5:
        raise ValueError(
            f"trainable_backbone_layers must be an integer in [0, 5], got "
            f"{trainable_backbone_layers!r} (5 trains the whole backbone)"
        )
    trainable_backbone_layers = int(trainable_backbone_layers)
    if seed is not None:
        seed = _check_int("seed", seed, 0)

    config = {
        "backbone": backbone,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "anchor_sizes": anchor_sizes,
        "aspect_ratios": aspect_ratios,
        "fpn_channels": fpn_channels,
        "box_representation_size": box_representation_size,
        "mask_head_channels": mask_head_channels,
        "box_nms_thresh": box_nms_thresh,
        "box_score_thresh": box_score_thresh,
        "box_detections_per_img": box_detections_per_img,
        **rpn,
        "peak_proposals": peak_proposals,
        "contrast_peak_proposals": contrast_peak_proposals,
        "centre_net_channels": centre_net_channels,
        "centre_proposals": centre_proposals,
        "centre_threshold": centre_threshold,
        "centre_detect": centre_detect,
        "trainable_backbone_layers": trainable_backbone_layers,
        "seed": seed,
    }
    if seed is None:
        return _build(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(config)


def _build(config):
    """Assemble the model from a validated config."""
    body = _build_backbone(
        config["backbone"],
        config["in_channels"],
        config["fpn_channels"],
        config["trainable_backbone_layers"],
    )
    anchor_generator = AnchorGenerator(
        sizes=config["anchor_sizes"],
        aspect_ratios=(config["aspect_ratios"],) * _N_LEVELS,
    )
    n_anchors = anchor_generator.num_anchors_per_location()[0]
    channels = config["fpn_channels"]
    box_roi_pool = _roi_pool(7)
    mask_roi_pool = _roi_pool(14)
    representation = config["box_representation_size"]
    mask_channels = config["mask_head_channels"]

    model = MaskRCNN(
        body,
        num_classes=None,
        min_size=1,  # unused: the transform is replaced below
        max_size=1,
        image_mean=[0.0] * config["in_channels"],
        image_std=[1.0] * config["in_channels"],
        rpn_anchor_generator=anchor_generator,
        rpn_head=RPNHead(channels, n_anchors),
        rpn_pre_nms_top_n_train=config["rpn_pre_nms_top_n_train"],
        rpn_pre_nms_top_n_test=config["rpn_pre_nms_top_n_test"],
        rpn_post_nms_top_n_train=config["rpn_post_nms_top_n_train"],
        rpn_post_nms_top_n_test=config["rpn_post_nms_top_n_test"],
        box_roi_pool=box_roi_pool,
        box_head=TwoMLPHead(channels * 7 * 7, representation),
        box_predictor=FastRCNNPredictor(representation, config["num_classes"]),
        box_score_thresh=config["box_score_thresh"],
        box_nms_thresh=config["box_nms_thresh"],
        box_detections_per_img=config["box_detections_per_img"],
        box_batch_size_per_image=256,
        mask_roi_pool=mask_roi_pool,
        mask_head=MaskRCNNHeads(channels, list(mask_channels), 1, norm_layer=nn.BatchNorm2d),
        mask_predictor=_MaskPredictor(mask_channels[-1], mask_channels[-1], config["num_classes"]),
    )
    model.transform = _NoResizeTransform(config["in_channels"], _SIZE_DIVISIBLE)
    model.rpn.__class__ = _PeakProposalRPN  # same parameters and state dict, one extra step
    model.rpn.peak_proposals = config["peak_proposals"]
    model.rpn.contrast_peak_proposals = config["contrast_peak_proposals"]
    if config.get("centre_net_channels") is not None:
        model.centre_net = CentreNet(in_channels=config["in_channels"], channels=config["centre_net_channels"])
    model.deblend_config = dict(config)
    return model


#: Local maxima of the 3x3-smoothed asinh(S/N) window above this value seed peak proposals...
PEAK_THRESHOLD = 1.5
#: ...and above this many robust standard deviations of the smoothed window (correlated noise
#: smooths less, so its threshold rises; for white noise the two agree).
PEAK_NSIGMA = 4.5
#: Side lengths (pixels) of the square boxes put around each peak; the box head refines them.
PEAK_BOX_SIZES = (6.0, 12.0)
#: A peak is the maximum of its PEAK_WINDOW x PEAK_WINDOW neighbourhood.
PEAK_WINDOW = 5
#: Contrast peaks: maxima of the smoothed window minus its PEAK_CONTRAST_BOX x PEAK_CONTRAST_BOX
#: running mean (a companion on a brighter neighbour's slope has one, but no maximum of its own)...
PEAK_CONTRAST_BOX = 5
#: ...whose contrast exceeds this many robust standard deviations of the window's contrast.
PEAK_CONTRAST_NSIGMA = 1.0


def _robust_sigma(values):
    """1.4826 x the median absolute deviation of a tensor's values."""
    return float(1.4826 * (values - values.median()).abs().median())


def _running_max(images, size):
    """Maximum over each pixel's ``size`` x ``size`` neighbourhood of ``(batch, 1, ny, nx)`` images.

    Equals ``F.max_pool2d(images, size, stride=1, padding=size // 2)`` exactly (the
    padding never wins), as shifted elementwise maxima along each axis in turn: on a
    CPU about ten times faster than the pooling kernel at stride 1.
    """
    h = size // 2
    ny, nx = images.shape[-2:]
    padded = F.pad(images, (h, h, h, h), value=float("-inf"))
    rows = padded[..., :ny, :]
    for i in range(1, size):
        rows = torch.maximum(rows, padded[..., i:i + ny, :])
    out = rows[..., :nx]
    for j in range(1, size):
        out = torch.maximum(out, rows[..., j:j + nx])
    return out


def _square_boxes(xs, ys, half, ny, nx):
    """(n * len(half), 4) boxes of side ``2 * half`` centred on pixels ``(xs, ys)``, clipped."""
    cx, cy = xs.to(half.dtype) + 0.5, ys.to(half.dtype) + 0.5
    boxes = torch.stack([cx[None] - half, cy[None] - half, cx[None] + half, cy[None] + half], dim=-1)
    boxes = boxes.reshape(-1, 4)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, nx)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, ny)
    return boxes


def _brightest(selected, values, n):
    """``(xs, ys)`` of up to ``n`` pixels of the boolean map ``selected``, highest ``values`` first."""
    ys, xs = selected.nonzero(as_tuple=True)
    keep = values[ys, xs].argsort(descending=True)[:n]
    return xs[keep], ys[keep]


def peak_boxes(images, image_sizes, *, max_peaks, max_contrast_peaks=0, threshold=PEAK_THRESHOLD,
               nsigma=PEAK_NSIGMA, sizes=PEAK_BOX_SIZES, window=PEAK_WINDOW,
               contrast_box=PEAK_CONTRAST_BOX, contrast_nsigma=PEAK_CONTRAST_NSIGMA):
    """Square boxes around the brightest local maxima of each image.

    A pixel is a peak when it is the maximum of its ``window`` x ``window``
    neighbourhood in the image smoothed by a 3x3 mean and exceeds both
    ``threshold`` and ``nsigma`` times that smoothed image's robust standard
    deviation (1.4826 x its median absolute deviation). Close
    companions with a peak of their own but no region proposal reach the box
    head this way, which scores, classifies and refines them like any
    proposal.

    A companion on the slope of a brighter neighbour often has no maximum of
    its own, only a bump. With ``max_contrast_peaks`` > 0, maxima of the
    *contrast*, the smoothed image minus its ``contrast_box`` x
    ``contrast_box`` running mean, get boxes too: those above the same floor
    in the smoothed image, above ``contrast_nsigma`` robust standard
    deviations of the contrast, and more than 2 pixels from any local
    maximum of the smoothed image (a bright one already has its boxes).

    Parameters
    ----------
    images : Tensor, shape (batch, ny, nx)
        Normalised detection images (asinh(S/N)), zero-padded.
    image_sizes : list of (int, int)
        Each image's unpadded ``(ny, nx)``; boxes are clipped to it.
    max_peaks : int
        Peaks kept per image, brightest first.
    max_contrast_peaks : int, optional
        Contrast peaks kept per image, highest contrast first; 0 (default)
        looks for none.
    threshold : float, optional
        Lowest peak value, in the images' units.
    nsigma : float, optional
        Lowest peak value in robust standard deviations of each smoothed image.
    sizes : sequence of float, optional
        Box side lengths; each peak gets one box per size.
    window : int, optional
        Odd side of the neighbourhood a peak is the maximum of.
    contrast_box : int, optional
        Odd side of the running mean subtracted for the contrast.
    contrast_nsigma : float, optional
        Lowest contrast of a contrast peak, in robust standard deviations of
        each image's contrast.

    Returns
    -------
    list of Tensor, shape (n_i, 4)
        x1, y1, x2, y2 per image, in the images' pixel coordinates: the
        peaks' boxes, then the contrast peaks'.
    """
    smooth = F.avg_pool2d(images[:, None], 3, stride=1, padding=1, count_include_pad=False)
    is_peak = smooth == _running_max(smooth, window)
    if max_contrast_peaks:
        contrast = smooth - F.avg_pool2d(smooth, contrast_box, stride=1, padding=contrast_box // 2,
                                         count_include_pad=False)
        is_contrast_peak = contrast == _running_max(contrast, window)
        near_peak = _running_max(is_peak.to(images.dtype), 5) > 0
    half = torch.as_tensor(sizes, dtype=images.dtype, device=images.device)[:, None] / 2
    out = []
    for b, (ny, nx) in enumerate(image_sizes):
        window_values = smooth[b, 0, :ny, :nx]
        bright = window_values > max(float(threshold), nsigma * _robust_sigma(window_values))
        xs, ys = _brightest(is_peak[b, 0, :ny, :nx] & bright, window_values, max_peaks)
        boxes = [_square_boxes(xs, ys, half, ny, nx)]
        if max_contrast_peaks:
            values = contrast[b, 0, :ny, :nx]
            selected = (is_contrast_peak[b, 0, :ny, :nx] & ~near_peak[b, 0, :ny, :nx] & bright
                        & (values > contrast_nsigma * _robust_sigma(values)))
            xs, ys = _brightest(selected, values, max_contrast_peaks)
            boxes.append(_square_boxes(xs, ys, half, ny, nx))
        out.append(torch.cat(boxes))
    return out


class _PeakProposalRPN(RegionProposalNetwork):
    """torchvision's RPN whose inference proposals also include `peak_boxes`.

    ``peak_proposals`` and ``contrast_peak_proposals`` are `peak_boxes`'
    ``max_peaks`` and ``max_contrast_peaks``; with both 0 it is torchvision's RPN.
    In training the peak boxes are added only when ``train_peak_proposals`` is set.
    """

    peak_proposals = 0
    contrast_peak_proposals = 0
    #: Also give the box head the peak boxes in training (`deblend.training.TrainConfig.peak_proposals`),
    #: so it learns to score the candidates it meets at inference.
    train_peak_proposals = False

    def forward(self, images, features, targets=None):
        boxes, losses = super().forward(images, features, targets)
        if (self.training and not self.train_peak_proposals) or not (self.peak_proposals
                                                                     or self.contrast_peak_proposals):
            return boxes, losses
        extra = peak_boxes(images.tensors[:, 0], images.image_sizes, max_peaks=self.peak_proposals,
                           max_contrast_peaks=self.contrast_peak_proposals, threshold=PEAK_THRESHOLD,
                           nsigma=PEAK_NSIGMA, sizes=PEAK_BOX_SIZES, window=PEAK_WINDOW,
                           contrast_box=PEAK_CONTRAST_BOX, contrast_nsigma=PEAK_CONTRAST_NSIGMA)
        return [torch.cat([b, e.to(b.dtype)]) for b, e in zip(boxes, extra, strict=True)], losses


def set_peak_proposals(model, max_peaks, *, max_contrast_peaks=None):
    """Set how many peak proposals (:func:`peak_boxes`) inference adds per window; 0 adds none.

    Like `set_test_proposals`, the values are part of the model's
    configuration, so `save_weights` records them and `load_weights` restores
    them.

    Parameters
    ----------
    model : torchvision.models.detection.MaskRCNN
        A model from :func:`build_mask_rcnn` or :func:`load_weights`; changed
        in place.
    max_peaks : int
        Boxes around up to this many local maxima per window.
    max_contrast_peaks : int, optional
        Boxes around up to this many contrast peaks per window (see
        :func:`peak_boxes`); None (default) keeps the model's setting.

    Returns
    -------
    torchvision.models.detection.MaskRCNN
        ``model``.
    """
    max_peaks = _check_int("max_peaks", max_peaks, 0)
    config = model_config(model)
    if max_contrast_peaks is None:
        max_contrast_peaks = config["contrast_peak_proposals"]
    max_contrast_peaks = _check_int("max_contrast_peaks", max_contrast_peaks, 0)
    model.rpn.peak_proposals = max_peaks
    model.rpn.contrast_peak_proposals = max_contrast_peaks
    config.update(peak_proposals=max_peaks, contrast_peak_proposals=max_contrast_peaks)
    model.deblend_config = config
    return model


#: A detected centre (``centre_detect``) takes the box of a box-head detection centred within this
#: many pixels of it: that detection is the same source.
CENTRE_MATCH_DISTANCE = 2.0


def attach_centre_net(model, centre_net, *, proposals=100, threshold=0.3, detect=False):
    """Give a Mask R-CNN a trained centre detector and set how inference uses it.

    Like `set_peak_proposals`, the settings are part of the model's
    configuration and the centre detector's weights part of its state dict,
    so `save_weights` writes one file that `load_weights` restores whole.

    Parameters
    ----------
    model : torchvision.models.detection.MaskRCNN
        From :func:`build_mask_rcnn` or :func:`load_weights`; changed in place.
    centre_net : deblend.models.centre_net.CentreNet
        Trained (``pipelines/train_centre_net.py``); copied into ``model.centre_net``.
    proposals, threshold, detect
        :func:`build_mask_rcnn`'s ``centre_proposals``, ``centre_threshold`` and
        ``centre_detect``.

    Returns
    -------
    torchvision.models.detection.MaskRCNN
        ``model``.
    """
    if not isinstance(centre_net, CentreNet):
        raise ValueError(f"centre_net must be a deblend.models.centre_net.CentreNet, got "
                         f"{type(centre_net).__name__}")
    config = model_config(model)
    config.update(centre_net_channels=tuple(centre_net.config["channels"]), centre_proposals=proposals,
                  centre_threshold=threshold, centre_detect=detect)
    checked = {k: v for k, v in model_config(build_mask_rcnn(**config)).items() if k.startswith("centre")}
    fresh = CentreNet(in_channels=config["in_channels"], channels=checked["centre_net_channels"])
    fresh.load_state_dict(centre_net.state_dict())
    device = next(model.parameters()).device
    model.centre_net = fresh.to(device).train(model.training)
    config.update(checked)
    model.deblend_config = config
    return model


def centre_boxes(model, images, image_sizes):
    """Proposals around the maxima of the model's centre heatmap, for each image of a batch.

    Parameters
    ----------
    model : torchvision.models.detection.MaskRCNN
        With a centre detector (:func:`attach_centre_net`) and
        ``centre_proposals`` > 0.
    images : Tensor, shape (batch, 1, ny, nx)
        The padded batch the backbone sees.
    image_sizes : list of (int, int)
        Each image's unpadded size.

    Returns
    -------
    list of (boxes, values)
        Per image: ``(2 n, 4)`` boxes (`PEAK_BOX_SIZES`: all the first size's,
        then all the second's, one per centre in the same order) and the ``n``
        centres' heatmap values, highest first.
    """
    config = model.deblend_config
    heat = torch.sigmoid(model.centre_net(images).float())[:, 0]
    half = torch.as_tensor(PEAK_BOX_SIZES, dtype=heat.dtype, device=heat.device)[:, None] / 2
    out = []
    for (ny, nx), (xs, ys, values) in zip(image_sizes, centre_peaks(
            heat, threshold=config["centre_threshold"], max_centres=config["centre_proposals"]), strict=True):
        inside = (xs < nx) & (ys < ny)
        xs, ys, values = xs[inside], ys[inside], values[inside]
        out.append((_square_boxes(xs, ys, half, ny, nx), values))
    return out


def model_config(model):
    """Return the :func:`build_mask_rcnn` arguments a model was built with.

    Parameters
    ----------
    model : torchvision.models.detection.MaskRCNN
        A model from :func:`build_mask_rcnn` or :func:`load_weights`.

    Returns
    -------
    dict
        Keyword arguments; ``build_mask_rcnn(**model_config(model))`` rebuilds
        the same architecture.

    Raises
    ------
    ValueError
        If the model was not built by :func:`build_mask_rcnn`.
    """
    config = getattr(model, "deblend_config", None)
    if not isinstance(config, dict):
        raise ValueError(
            f"model has no deblend_config (got a {type(model).__name__}); build it with "
            "deblend.models.build_mask_rcnn or load it with deblend.models.load_weights"
        )
    return dict(config)


def set_test_proposals(model, pre_nms_top_n, post_nms_top_n):
    """Set how many RPN proposals inference keeps per window, before and after NMS.

    More proposals find more close companions (higher recall on blends) at
    the cost of time in the box head; the value is part of the model's
    configuration, so `save_weights` records it and `load_weights` restores
    it. Training is unaffected.

    Parameters
    ----------
    model : torchvision.models.detection.MaskRCNN
        A model from :func:`build_mask_rcnn` or :func:`load_weights`; changed
        in place.
    pre_nms_top_n, post_nms_top_n : int
        Proposals per FPN level kept before NMS, and in total after it.

    Returns
    -------
    torchvision.models.detection.MaskRCNN
        ``model``.
    """
    pre = _check_int("pre_nms_top_n", pre_nms_top_n, 1)
    post = _check_int("post_nms_top_n", post_nms_top_n, 1)
    config = model_config(model)
    model.rpn._pre_nms_top_n["testing"] = pre
    model.rpn._post_nms_top_n["testing"] = post
    config.update(rpn_pre_nms_top_n_test=pre, rpn_post_nms_top_n_test=post)
    model.deblend_config = config
    return model


#: State-dict prefixes of the mask branch (head and predictor), replaced by :func:`with_mask_head`.
MASK_BRANCH = ("roi_heads.mask_head.", "roi_heads.mask_predictor.")
#: State-dict prefixes of the box branch (head and predictor): detection scores, classes and boxes.
BOX_BRANCH = ("roi_heads.box_head.", "roi_heads.box_predictor.")


def with_mask_head(model, mask_head_channels, *, seed=0):
    """Return a copy of ``model`` with a new, freshly initialised mask head.

    Everything but the mask branch (`MASK_BRANCH`: the mask head's
    convolutions and the mask predictor) keeps ``model``'s weights, so
    detections are unchanged and only the masks need training, e.g. to trade
    a narrower (faster) mask head against mask quality.

    Parameters
    ----------
    model : torchvision.models.detection.MaskRCNN
        A model from :func:`build_mask_rcnn` or :func:`load_weights`.
    mask_head_channels : sequence of int
        Output channels of the new head's 3x3 convolutions, e.g. ``(32, 32)``.
    seed : int, optional
        Initialisation seed of the new head.

    Returns
    -------
    torchvision.models.detection.MaskRCNN
        A new model on the CPU; ``model`` is not modified.
    """
    config = model_config(model)
    config.update(mask_head_channels=mask_head_channels, seed=seed)
    new = build_mask_rcnn(**config)
    kept = {k: v for k, v in model.state_dict().items() if not k.startswith(MASK_BRANCH)}
    missing, unexpected = new.load_state_dict(kept, strict=False)
    assert not unexpected and all(k.startswith(MASK_BRANCH) for k in missing), (missing, unexpected)
    return new


def count_parameters(model, *, trainable_only=False):
    """Return the number of parameters of ``model``.

    Parameters
    ----------
    model : torch.nn.Module
        Any module.
    trainable_only : bool, optional
        Count only parameters with ``requires_grad``.

    Returns
    -------
    int
        The number of scalar parameters.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def save_weights(model, path, *, metadata):
    """Write a model's configuration and weights to ``path``, atomically.

    The file holds ``{"format", "config", "state_dict", "metadata"}``; floating
    point tensors are stored in float16 (halving the file; any tensor that
    would overflow stays float32).  It is written to a temporary file in the
    same directory, checked to load with ``weights_only=True``, and renamed over
    ``path``, so a reader never sees a partial file.

    Parameters
    ----------
    model : torchvision.models.detection.MaskRCNN
        A model from :func:`build_mask_rcnn` or :func:`load_weights`.
    path : str or os.PathLike
        Destination file (conventionally ``*.pt``); its directory must exist.
    metadata : dict
        Free-form provenance (training data, recipe, metrics) made of plain
        Python types: str, int, float, bool, None, lists, tuples and dicts.

    Returns
    -------
    str
        The sha256 hex digest of the written file.

    Raises
    ------
    ValueError
        If the model was not built by :func:`build_mask_rcnn`, or ``metadata``
        is not a dict of plain types.
    """
    return save_model(model, path, kind="mask_rcnn", config=model_config(model), metadata=metadata)


def load_weights(path, *, device="cpu", expected_sha256=None):
    """Rebuild a model from a file written by :func:`save_weights`.

    Parameters
    ----------
    path : str or os.PathLike
        The weights file.
    device : str or torch.device, optional
        Where to put the model (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
    expected_sha256 : str, optional
        If given, the file's sha256 hex digest must equal it.

    Returns
    -------
    torchvision.models.detection.MaskRCNN
        The model in float32 and eval mode on ``device``, with
        ``deblend_config``, ``deblend_metadata`` and ``deblend_sha256`` set.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the sha256 does not match, the device is unusable, or the file is
        not a deblend Mask R-CNN weights file.
    """
    payload, digest, device = load_payload(path, kind="mask_rcnn", device=device,
                                           expected_sha256=expected_sha256)
    try:
        model = build_mask_rcnn(**payload["config"])
        model.load_state_dict(payload["state_dict"])
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path} does not match the Mask R-CNN this deblend builds: {error}") from error
    model.deblend_metadata = payload.get("metadata", {})
    model.deblend_sha256 = digest
    return model.to(device).eval()

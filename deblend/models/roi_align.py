"""RoIAlign as two small matrix products, for the Mask R-CNN's box and mask heads.

torchvision's CPU ``roi_align`` kernel runs on one thread and visits every
output cell, sample and channel in turn; on the two-core machines deblend
targets it took about a quarter of the detection time. With a fixed sampling
ratio, RoIAlign (``aligned=False``) is *separable*: each output cell averages
bilinear samples on a regular grid, and bilinear interpolation is a product of
a row weight and a column weight, so for one region

    out[c, i, j] = sum_y sum_x Wy[i, y] * Wx[j, x] * F[c, y, x]

with ``Wy`` (``P`` x rows) and ``Wx`` (``P`` x columns) holding the averaged
interpolation weights. `roi_align` cuts the few rows and columns a region
touches out of the feature map (regions grouped by that extent) and applies
``Wx`` then ``Wy`` as batched matrix products, which run on every core. It
reproduces torchvision's kernel (the same sample positions, clamping at the
border and zero weight for samples more than one pixel outside), up to float
rounding, and it is differentiable, so training uses it too.
"""

from __future__ import annotations

import torch
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as tv_roi_align

__all__ = ["roi_align", "SeparableMultiScaleRoIAlign"]

# Regions are grouped by the rows/columns they touch, rounded up to these sizes (larger: one group).
_EXTENT_BUCKETS = (4, 8, 16, 32)


def _axis_weights(start, length, n_out, sampling_ratio, size):
    """Interpolation weights along one axis: (R, n_out, K) and the first index each row refers to.

    ``start``/``length`` are the regions' first coordinate and extent in
    feature pixels (extent at least 1, as in torchvision), ``size`` the
    feature map's size along the axis.
    """
    n_samples = n_out * sampling_ratio
    steps = (torch.arange(n_samples, dtype=start.dtype, device=start.device) + 0.5) / n_samples
    pos = start[:, None] + length[:, None] * steps  # (R, n_samples)
    valid = (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0.0)
    low = pos.floor().long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(pos), pos - low.to(pos.dtype))
    scale = valid.to(pos.dtype) / sampling_ratio
    first = low[:, 0].clone()  # positions increase along the axis, so this is the smallest index
    return low - first[:, None], high - first[:, None], (1.0 - frac) * scale, frac * scale, first


def _dense(low, high, w_low, w_high, n_out, sampling_ratio, extent):
    """Scatter per-sample weights into (R, n_out, extent), summing each bin's samples."""
    n_rois = low.shape[0]
    dense = w_low.new_zeros((n_rois, n_out * sampling_ratio, extent))
    dense.scatter_add_(2, low[..., None], w_low[..., None])
    dense.scatter_add_(2, high[..., None], w_high[..., None])
    return dense.view(n_rois, n_out, sampling_ratio, extent).sum(dim=2)


def _align_group(feat_hwc, batch, y_parts, x_parts, n_out, sampling_ratio, ky, kx):
    """RoIAlign of regions whose rows fit in ``ky`` and columns in ``kx``: (R, P, P, C)."""
    height, width = feat_hwc.shape[1:3]
    (ylo, yhi, wylo, wyhi, y0), (xlo, xhi, wxlo, wxhi, x0) = y_parts, x_parts
    # Crops must lie inside the map: shift a crop that would overhang back, and its weights with it.
    ys, xs = y0.clamp(max=height - ky), x0.clamp(max=width - kx)
    wy = _dense(ylo + (y0 - ys)[:, None], yhi + (y0 - ys)[:, None], wylo, wyhi, n_out, sampling_ratio, ky)
    wx = _dense(xlo + (x0 - xs)[:, None], xhi + (x0 - xs)[:, None], wxlo, wxhi, n_out, sampling_ratio, kx)
    rows = ys[:, None] + torch.arange(ky, device=ys.device)
    cols = xs[:, None] + torch.arange(kx, device=xs.device)
    crops = feat_hwc[batch[:, None, None], rows[:, :, None], cols[:, None, :]]  # (R, ky, kx, C)
    n_rois, channels = crops.shape[0], crops.shape[-1]
    # Columns first, then rows, each as one batched product of well-shaped matrices.
    across = torch.bmm(wx, crops.transpose(1, 2).reshape(n_rois, kx, ky * channels))  # (R, P, ky*C)
    across = across.view(n_rois, n_out, ky, channels).transpose(1, 2).reshape(n_rois, ky, n_out * channels)
    return torch.bmm(wy, across).view(n_rois, n_out, n_out, channels)  # (R, P, P, C)


def _roi_align_hwc(features, rois, output_size, spatial_scale, sampling_ratio):
    """`roi_align` with the result laid out (R, P, P, C)."""
    n_rois = rois.shape[0]
    _, channels, height, width = features.shape
    if n_rois == 0:
        return features.new_zeros((0, output_size, output_size, channels))
    feat_hwc = features.permute(0, 2, 3, 1)
    boxes = rois[:, 1:] * spatial_scale
    y_parts = _axis_weights(boxes[:, 1], (boxes[:, 3] - boxes[:, 1]).clamp(min=1.0), output_size,
                            sampling_ratio, height)
    x_parts = _axis_weights(boxes[:, 0], (boxes[:, 2] - boxes[:, 0]).clamp(min=1.0), output_size,
                            sampling_ratio, width)
    extent = torch.maximum(y_parts[1].max(dim=1).values, x_parts[1].max(dim=1).values) + 1
    bucket = torch.bucketize(extent, torch.tensor(_EXTENT_BUCKETS, device=extent.device))
    batch = rois[:, 0].long()
    groups = torch.unique(bucket).tolist()
    out = None if len(groups) == 1 else features.new_empty((n_rois, output_size, output_size, channels))
    for b in groups:
        index = torch.nonzero(bucket == b).flatten()
        k = _EXTENT_BUCKETS[b] if b < len(_EXTENT_BUCKETS) else int(extent[index].max())
        ky, kx = min(k, height), min(k, width)  # a region never touches more than the whole map
        group = _align_group(feat_hwc, batch[index], tuple(p[index] for p in y_parts),
                             tuple(p[index] for p in x_parts), output_size, sampling_ratio, ky, kx)
        if out is None:
            return group
        out.index_copy_(0, index, group)
    return out


def roi_align(features, rois, output_size, spatial_scale, sampling_ratio):
    """Compute torchvision's ``roi_align(..., aligned=False)`` with batched matrix products.

    Parameters
    ----------
    features : torch.Tensor, shape (B, C, H, W)
        Feature maps (any memory format; channels-last avoids a copy).
    rois : torch.Tensor, shape (R, 5)
        ``(batch_index, x0, y0, x1, y1)`` in input-image pixels.
    output_size : int
        Output cells per side.
    spatial_scale : float
        Feature pixels per input pixel.
    sampling_ratio : int
        Samples per cell and axis; must be positive (torchvision's adaptive
        ``<= 0`` is passed on to torchvision's kernel).

    Returns
    -------
    torch.Tensor, shape (R, C, output_size, output_size)
        In channels-last memory format.
    """
    if sampling_ratio <= 0:
        return tv_roi_align(features, rois, output_size, spatial_scale, sampling_ratio, False)
    return _roi_align_hwc(features, rois, output_size, spatial_scale, sampling_ratio).permute(0, 3, 1, 2)


class SeparableMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` with `roi_align` in place of its kernel.

    ``scales`` and ``map_levels`` must be set before the first call (deblend's
    feature strides are fixed; see ``deblend.models.mask_rcnn._roi_pool``).
    """

    def forward(self, x, boxes, image_shapes):
        """Pool ``boxes`` (a list of (N, 4) per image) from the feature maps ``x`` (dict)."""
        if self.scales is None or self.map_levels is None:
            raise RuntimeError("SeparableMultiScaleRoIAlign needs scales and map_levels set up front")
        if self.output_size[0] != self.output_size[1]:
            raise ValueError(f"output_size must be square, got {self.output_size!r}")
        features = [x[name] for name in self.featmap_names]
        rois = torch.cat([torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes)])
        levels = self.map_levels(boxes)
        size = self.output_size[0]
        present = torch.unique(levels).tolist()
        if len(present) == 1:  # every region on one level (or none at all)
            level = present[0] if present else 0
            return roi_align(features[level], rois, size, self.scales[level], self.sampling_ratio)
        result = features[0].new_empty((len(rois), size, size, features[0].shape[1]))
        for level in present:
            index = torch.nonzero(levels == level).flatten()
            result.index_copy_(0, index, _roi_align_hwc(features[level], rois[index], size,
                                                         self.scales[level], self.sampling_ratio))
        return result.permute(0, 3, 1, 2)

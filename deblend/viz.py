"""Matplotlib figures for notebooks, quick-looks and the README.

Every function returns the `~matplotlib.figure.Figure` (or draws into a given
axis) and never calls ``plt.show()``. Images are shown with ``origin='lower'``
so pixel (x, y) = ``image[y, x]`` appears where DS9 shows it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["show_image", "overlay_segmentation", "plot_comparison", "label_colors"]


def label_colors(n_labels, *, seed=0):
    """Stable, distinguishable RGBA colours for labels 1..n (row 0 is transparent)."""
    import matplotlib

    rng = np.random.default_rng(seed)
    cmap = matplotlib.colormaps["hsv"]
    colors = cmap(rng.permutation(max(n_labels, 1)) / max(n_labels, 1))
    return np.vstack([[0, 0, 0, 0], colors])


def show_image(ax, image, *, stretch="asinh", percent=99.5, cmap="gray"):
    """Draw a 2-D image with an astropy stretch (``'asinh'``, ``'linear'``, ``'log'``, ``'sqrt'``, ``'zscale'``).

    Parameters
    ----------
    ax : matplotlib.axes.Axes
    image : ndarray, shape (ny, nx)
    stretch : str, optional
    percent : float, optional
        Percentile interval for the limits (ignored for ``'zscale'``).
    cmap : str, optional

    Returns
    -------
    matplotlib.image.AxesImage
    """
    from astropy.visualization import ImageNormalize, ZScaleInterval, simple_norm

    image = np.asarray(image, dtype=float)
    if stretch == "zscale":
        norm = ImageNormalize(image, interval=ZScaleInterval())
    else:
        norm = simple_norm(image, stretch, percent=percent)
    return ax.imshow(image, origin="lower", norm=norm, cmap=cmap, interpolation="nearest")


def overlay_segmentation(ax, labels, *, alpha=0.9, seed=0):
    """Draw the outlines of a label map over an image, one stable colour per label.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
    labels : ndarray of int, shape (ny, nx)
    alpha : float, optional
    seed : int, optional
        Seed of the colour permutation.

    Returns
    -------
    matplotlib.image.AxesImage
    """
    from skimage.segmentation import find_boundaries

    labels = np.asarray(labels)
    edges = find_boundaries(labels, mode="inner") & (labels > 0)
    colors = label_colors(int(labels.max()) if labels.size else 0, seed=seed)
    rgba = colors[np.where(edges, labels, 0)]
    rgba[..., 3] *= alpha
    return ax.imshow(rgba, origin="lower", interpolation="nearest")


def plot_comparison(image, label_maps, *, stretch="asinh", panel_size=4.0, title=None):
    """Side-by-side panels: the image, then each label map's outlines over it.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
    label_maps : dict of str to ndarray
        Panel title -> label map (e.g. ``{'truth': ..., 'sep': ..., 'photutils': ...}``).
    stretch : str, optional
        See `show_image`.
    panel_size : float, optional
        Inches per panel.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    n = 1 + len(label_maps)
    fig = Figure(figsize=(panel_size * n, panel_size + 0.4), layout="constrained")
    axes = fig.subplots(1, n, sharex=True, sharey=True)
    show_image(axes[0], image, stretch=stretch)
    axes[0].set_title("image")
    for ax, (name, labels) in zip(axes[1:], label_maps.items(), strict=True):
        show_image(ax, image, stretch=stretch)
        overlay_segmentation(ax, labels)
        ax.set_title(f"{name} ({int(np.unique(labels[labels > 0]).size)} sources)")
    for ax in axes:
        ax.set_xlabel("x [pix]")
    axes[0].set_ylabel("y [pix]")
    if title:
        fig.suptitle(title)
    return fig

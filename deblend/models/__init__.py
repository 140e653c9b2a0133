"""Neural networks of deblend: the Mask R-CNN detector/segmenter and its centre detector."""

from deblend.models.mask_rcnn import (
    BACKBONES,
    CLASS_NAMES,
    attach_centre_net,
    build_mask_rcnn,
    count_parameters,
    load_weights,
    model_config,
    save_weights,
    set_peak_proposals,
    set_test_proposals,
    with_mask_head,
)

__all__ = [
    "BACKBONES",
    "CLASS_NAMES",
    "attach_centre_net",
    "build_mask_rcnn",
    "count_parameters",
    "load_weights",
    "model_config",
    "save_weights",
    "set_peak_proposals",
    "set_test_proposals",
    "with_mask_head",
]

"""deblend: deblending of astronomical survey images.

The public API is re-exported here; each name lives in the module of its concept.
"""

from deblend._version import __version__
from deblend.batch import run_batch
from deblend.catalog import make_catalog
from deblend.exceptions import DeblendWarning, InputError, NoSourcesWarning, WCSWarning
from deblend.io import Image, read_catalog, read_image, read_segmentation, write_catalog, write_segmentation
from deblend.merge import merge_catalogs
from deblend.pipeline import METHODS, Deblender
from deblend.result import DeblendResult

__all__ = [
    "__version__",
    "Deblender",
    "DeblendResult",
    "METHODS",
    "Image",
    "read_image",
    "read_segmentation",
    "read_catalog",
    "write_catalog",
    "write_segmentation",
    "make_catalog",
    "run_batch",
    "merge_catalogs",
    "InputError",
    "DeblendWarning",
    "NoSourcesWarning",
    "WCSWarning",
]

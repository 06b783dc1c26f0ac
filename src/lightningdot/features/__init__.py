"""Image side of the offline stage: pixels -> region features + box positions, and their store."""

from lightningdot.features.backbones import (
    Backbone,
    create_backbone,
    list_backbones,
    load_image,
    register_backbone,
)
from lightningdot.features.detector import read_detector_npz
from lightningdot.features.regions import (
    RegionBatch,
    RegionFeatures,
    collate_regions,
    concat_batches,
    grid_boxes,
)
from lightningdot.features.store import FeatureStore, FeatureStoreWriter, StoreInfo

__all__ = [
    "Backbone",
    "FeatureStore",
    "FeatureStoreWriter",
    "RegionBatch",
    "RegionFeatures",
    "collate_regions",
    "concat_batches",
    "StoreInfo",
    "create_backbone",
    "grid_boxes",
    "list_backbones",
    "load_image",
    "read_detector_npz",
    "register_backbone",
]

"""A training split in memory: its captions and its images' regions, preloaded from a store."""

from __future__ import annotations

from dataclasses import dataclass

from lightningdot.config import DataConfig
from lightningdot.data import Corpus, read_karpathy
from lightningdot.errors import DataError
from lightningdot.features import FeatureStore, RegionBatch


@dataclass
class TrainData:
    corpus: Corpus  # the split's images that have captions
    regions: RegionBatch  # preloaded, in corpus order


def load_split(data: DataConfig, split: str, store: FeatureStore, soft_labels: bool) -> TrainData:
    """One split of the recipe's annotations with its regions (`soft_labels`: with each
    region's class distribution, for SMRM).

    Raises:
        DataError: some of the split's images have no features in the store.
    """
    corpus = read_karpathy(data.annotations, split)
    missing = [im.key for im in corpus.images if im.key not in store]
    if missing:
        raise DataError(
            f"{len(missing)} {split} image(s) have no features in {store.root} "
            f"(e.g. {missing[0]}); run `ldot extract` first"
        )
    corpus = Corpus([im for im in corpus.images if im.captions])
    return TrainData(corpus, store.batch(corpus.keys(), soft_labels=soft_labels))

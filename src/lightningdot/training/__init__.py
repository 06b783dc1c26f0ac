"""Training: one loop for every trainer, each a task over its own objectives.

loop.py          fit(): epochs, steps, validation, checkpoints, resume, the log
optim.py         AdamW parameter groups and the warm-up + cosine schedule
distributed.py   torchrun: process group, rank, gathering across ranks
data.py          a training split with its regions preloaded
objectives.py    VMLM, SMRM, CMR and the re-ranker's ITM, as functions of tensors
masking.py       token and region masking, region dropping
pretrain.py      `ldot pretrain` / `ldot finetune`: the bi-encoder
align.py         `ldot align`: a new text encoder into an existing model's space
reranker.py      `ldot train-reranker`: the cross-attention re-ranker
bank.py          `ldot bank`: a model's query bank
"""

"""The one training loop, through each of its trainers: a run stopped and resumed equals a run
that was never stopped, continues the same log, and a changed recipe is refused."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightningdot.config import (
    AlignConfig,
    BertSize,
    DataConfig,
    LoopConfig,
    RerankerConfig,
    RerankTrainConfig,
    TextConfig,
    TrainConfig,
)
from lightningdot.errors import ConfigMismatchError, DataError
from lightningdot.model.checkpoint import save_model
from lightningdot.model.encoders import BiEncoder
from lightningdot.training.align import align
from lightningdot.training.pretrain import train
from lightningdot.training.reranker import train_reranker
from tests.helpers import tiny_model_config

EPOCHS = 3
# What differs between two runs of one recipe: the clock and the memory it read.
TIMING = {"seconds", "pairs_per_s", "images_per_s", "queries_per_s", "peak_rss_mb"}


def quiet(message: str) -> None:
    pass


class Stop(Exception):
    """Stands in for a kill in the middle of an epoch."""


def saved_model(tmp_path: Path) -> Path:
    model = BiEncoder(tiny_model_config(pooled_dim=8))
    model.init_pretrained()
    save_model(tmp_path / "bi", model.eval())
    return tmp_path / "bi"


def finetune_run(corpus_dir, store_dir, tmp_path, epochs=EPOCHS):
    cfg = TrainConfig(
        model=tiny_model_config(pooled_dim=8),
        data=DataConfig(str(corpus_dir / "captions.json"), str(store_dir)),
        loop=LoopConfig(epochs=epochs, batch_size=4, lr=1e-3),
        region_keep=0.5,  # random draws each step, which a resumed run must redo the same
        hard_negatives=1,
    )
    return cfg, lambda out, log=quiet, **kw: train(cfg, out, log=log, **kw)


def align_run(corpus_dir, store_dir, tmp_path, epochs=EPOCHS):
    size = BertSize(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    cfg = AlignConfig(
        teacher=str(saved_model(tmp_path)),
        text=TextConfig(pretrained=None, size=size, trainable_layers=2, max_length=16),
        annotations=[str(corpus_dir / "captions.json")],
        features=str(store_dir),
        loop=LoopConfig(epochs=epochs, batch_size=4, lr=1e-3),
    )
    return cfg, lambda out, log=quiet, **kw: align(cfg, out, log=log, **kw)


def reranker_run(corpus_dir, store_dir, tmp_path, epochs=EPOCHS):
    cfg = RerankTrainConfig(
        reranker=RerankerConfig(num_layers=1),
        data=DataConfig(str(corpus_dir / "captions.json"), str(store_dir)),
        bi_encoder=str(saved_model(tmp_path)),
        loop=LoopConfig(epochs=epochs, batch_size=4, lr=1e-3),
        negatives=2,
        mine_from=3,
        region_keep=0.5,
        fusion_grid=[0.5, 2.0],
    )
    return cfg, lambda out, log=quiet, **kw: train_reranker(cfg, out, log=log, val_k=3, **kw)


TRAINERS = pytest.mark.parametrize(
    "make_run", [finetune_run, align_run, reranker_run], ids=["finetune", "align", "reranker"]
)


def stop_at(epoch: int):
    """An `on_step` that stops the run in the middle of `epoch` (0-based), before it saves."""

    def on_step(e: int, step: int, steps: int, losses: dict) -> None:
        if e == epoch:
            raise Stop

    return on_step


def log_of(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@TRAINERS
def test_a_stopped_and_resumed_run_equals_one_never_stopped(
    make_run, corpus_dir, store_dir, tmp_path
):
    _, run = make_run(corpus_dir, store_dir, tmp_path)
    whole = run(tmp_path / "whole")
    with pytest.raises(Stop):
        run(tmp_path / "resumed", on_step=stop_at(1))
    assert [r["epoch"] for r in log_of(tmp_path / "resumed")] == [1]
    resumed = run(tmp_path / "resumed")

    assert resumed == whole
    # The same log, continued where it stopped: losses, validation, temperatures, fusion.
    assert log_of(tmp_path / "resumed") == log_of(tmp_path / "whole")
    assert [r["epoch"] for r in log_of(tmp_path / "resumed")] == list(range(1, EPOCHS + 1))
    for folder in ("last", "best"):
        a = load_file(tmp_path / "whole" / folder / "model.safetensors")
        b = load_file(tmp_path / "resumed" / folder / "model.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), folder


@TRAINERS
def test_a_finished_run_has_nothing_to_do_and_a_changed_recipe_is_refused(
    make_run, corpus_dir, store_dir, tmp_path
):
    cfg, run = make_run(corpus_dir, store_dir, tmp_path, epochs=1)
    best = run(tmp_path / "run")
    said: list[str] = []
    assert run(tmp_path / "run", log=said.append) == best  # the same recipe, run again
    assert "nothing to do" in said[0]
    assert len(log_of(tmp_path / "run")) == 1
    _, run_longer = make_run(corpus_dir, store_dir, tmp_path, epochs=2)
    with pytest.raises(ConfigMismatchError, match="epochs"):
        run_longer(tmp_path / "run")


def test_a_new_run_starts_a_new_log(corpus_dir, store_dir, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.jsonl").write_text('{"epoch": 7, "from": "an older run"}\n')
    _, run = finetune_run(corpus_dir, store_dir, tmp_path, epochs=1)
    run(tmp_path / "run")
    assert [r["epoch"] for r in log_of(tmp_path / "run")] == [1]


@pytest.mark.parametrize("other", [align_run, reranker_run], ids=["align", "reranker"])
def test_a_run_of_another_trainer_is_not_resumed(other, corpus_dir, store_dir, tmp_path):
    _, run = finetune_run(corpus_dir, store_dir, tmp_path, epochs=1)
    run(tmp_path / "run")
    _, run_other = other(corpus_dir, store_dir, tmp_path, epochs=1)
    with pytest.raises(DataError, match="another trainer"):
        run_other(tmp_path / "run")


def test_a_kill_while_last_is_swapped_resumes_from_the_folder_set_aside(
    corpus_dir, store_dir, tmp_path
):
    _, run = finetune_run(corpus_dir, store_dir, tmp_path, epochs=2)
    run(tmp_path / "whole")
    with pytest.raises(Stop):
        run(tmp_path / "run", on_step=stop_at(1))
    # As a kill between moving last/ aside and moving the next one in leaves the folder.
    (tmp_path / "run" / "last").rename(tmp_path / "run" / "last.old")
    said: list[str] = []
    run(tmp_path / "run", log=said.append)
    assert "resuming" in said[0] and not (tmp_path / "run" / "last.old").exists()
    assert log_of(tmp_path / "run") == log_of(tmp_path / "whole")


def test_a_kill_after_the_last_save_and_before_the_log_loses_no_record(
    corpus_dir, store_dir, tmp_path
):
    _, run = finetune_run(corpus_dir, store_dir, tmp_path, epochs=1)
    run(tmp_path / "run")
    whole = log_of(tmp_path / "run")
    (tmp_path / "run" / "log.jsonl").write_text("")  # the log of the last epoch never written
    run(tmp_path / "run")
    assert log_of(tmp_path / "run") == whole

"""`ldot align`: a student text encoder trained into a teacher's space, sharing its indexes."""

import dataclasses
import json
import math

import pytest
import torch
from safetensors import safe_open

import lightningdot.precision
from lightningdot.config import AlignConfig, BertSize, LoopConfig, TextConfig
from lightningdot.data import read_karpathy
from lightningdot.features import FeatureStore
from lightningdot.index.build import build_index
from lightningdot.model.checkpoint import index_identity, load_model, model_identity, save_model
from lightningdot.model.encoders import BiEncoder
from lightningdot.precision import mixed_precision
from lightningdot.retrieval import Retriever
from lightningdot.training.align import align, align_losses, centroids, make_student, weighted_sum
from tests.helpers import tiny_model_config


def test_align_losses_by_hand():
    e = torch.eye(2)
    student = [e, torch.tensor([[0.0, 1.0], [1.0, 0.0]])]
    images = e
    teacher = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    out = align_losses(student, images, torch.tensor(0.0), teacher, ["en", "zh"])
    # en: each caption's own image scores 1, the other 0: -log(e / (e + 1)) both ways.
    want_en = -math.log(math.e / (math.e + 1))
    # zh: captions swapped, each scores its own image 0 and the other 1.
    want_zh = -math.log(1 / (math.e + 1))
    assert out["cmr_en"] == pytest.approx(float(want_en), abs=1e-6)
    assert out["cmr_zh"] == pytest.approx(float(want_zh), abs=1e-6)
    # distill: row 0 equal, row 1 (0, 1) vs (0.6, 0.8): 0.36 + 0.04 = 0.4; mean 0.2.
    assert out["distill"] == pytest.approx(0.2, abs=1e-6)
    assert "distill_zh" not in out
    # zh captions (0, 1), (1, 0) against centroids e: 2 + 2 over 2 rows.
    out = align_losses(student, images, torch.tensor(0.0), teacher, ["en", "zh"], e)
    assert out["distill_zh"] == pytest.approx(2.0, abs=1e-6)
    assert weighted_sum(out, 1.0, 0.5) == pytest.approx(
        (float(want_en) + float(want_zh)) / 2 + 0.2 + 0.5 * 2.0, abs=1e-5
    )


def test_centroids_are_unit_means_per_image():
    from lightningdot.data import Corpus, ImageRecord

    corpus = Corpus([ImageRecord("a", ["x", "y"]), ImageRecord("b", ["z"])])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    got = centroids(text, corpus)
    assert torch.allclose(got, torch.tensor([[0.5**0.5, 0.5**0.5], [0.0, 1.0]]))


@pytest.fixture(params=[0, 8], ids=["transformer-view", "with-pooled-view"])
def teacher_dir(tmp_path, request):
    m = BiEncoder(tiny_model_config(pooled_dim=request.param))
    m.init_pretrained()
    save_model(tmp_path / "teacher", m.eval())
    return tmp_path / "teacher"


def translated(corpus_dir, tmp_path):
    """The tiny corpus with its captions in 'another language' (reversed words)."""
    data = json.loads((corpus_dir / "captions.json").read_text())
    for im in data["images"]:
        for s in im["sentences"]:
            s["raw"] = " ".join(reversed(s["raw"].split()))
    path = tmp_path / "captions_xx.json"
    path.write_text(json.dumps(data))
    return path


def test_align_keeps_the_teachers_image_side_and_its_indexes(
    corpus_dir, store_dir, teacher_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(lightningdot.precision, "native_bf16", lambda device: True)  # run bf16 here
    size = BertSize(
        hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64, vocab_size=30522
    )
    cfg = AlignConfig(
        teacher=str(teacher_dir),
        text=TextConfig(
            pretrained=None, size=size, trainable_layers=3, max_length=16, prefix="q: "
        ),
        annotations=[str(corpus_dir / "captions.json"), str(translated(corpus_dir, tmp_path))],
        features=str(store_dir),
        loop=LoopConfig(epochs=2, batch_size=4, lr=1e-4, bf16=True),
        cross_distill=0.5,
    )
    best = align(cfg, tmp_path / "run", log=lambda _: None)
    assert set(best["languages"]) == {"captions", "captions_xx"}
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2
    assert {"cmr_captions", "cmr_captions_xx", "distill", "distill_captions_xx"} <= set(
        log[0]["loss"]
    )

    teacher, student = load_model(teacher_dir), load_model(tmp_path / "run" / "best")
    for (name, a), (_, b) in zip(
        teacher.image.state_dict().items(), student.image.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert index_identity(student) == model_identity(teacher) != model_identity(student)
    # The student stores its text side alone; the rest is loaded from the teacher.
    with safe_open(tmp_path / "run" / "best" / "model.safetensors", framework="pt") as f:
        assert all(k.startswith("text.") for k in f.keys())
    assert not (tmp_path / "run" / "best" / "bank.safetensors").exists()

    # An index the teacher built opens with the student, and answers as the student encodes.
    corpus = read_karpathy(corpus_dir / "captions.json")
    build_index(
        teacher,
        str(teacher_dir),
        corpus,
        corpus_dir / "images",
        tmp_path / "ix",
        features=FeatureStore(store_dir),
    )
    r = Retriever.open(tmp_path / "ix", model=str(tmp_path / "run" / "best"))
    (answer,) = r.search_text(["picture red a"], k=3)
    with torch.no_grad():
        q = student.encode_text(["picture red a"])
        images = teacher.encode_image(FeatureStore(store_dir).batch(corpus.keys()))
    want = torch.topk((q @ images.T)[0], 3).indices.tolist()
    assert [x.id for x in answer.results] == [corpus.keys()[i] for i in want]


def test_a_student_that_cannot_hold_the_image_encoder_is_refused(teacher_dir, corpus_dir):
    from lightningdot.errors import ConfigMismatchError
    from lightningdot.training.align import student_config

    size = BertSize(hidden_size=32, num_layers=3, num_heads=2, intermediate_size=48)
    cfg = AlignConfig(
        text=TextConfig(pretrained=None, size=size, trainable_layers=1),
        annotations=[str(corpus_dir / "x.json")],
    )
    with pytest.raises(ConfigMismatchError, match="intermediate_size 64"):
        student_config(cfg, load_model(teacher_dir))


def student_of(teacher_dir, corpus_dir) -> tuple[AlignConfig, BiEncoder]:
    size = BertSize(hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64)
    cfg = AlignConfig(
        teacher=str(teacher_dir),
        text=TextConfig(pretrained=None, size=size, trainable_layers=3, max_length=16),
        annotations=[str(corpus_dir / "captions.json")],
    )
    torch.manual_seed(0)
    return cfg, make_student(cfg, load_model(teacher_dir))


def test_a_student_refuses_a_teacher_whose_weights_changed(teacher_dir, corpus_dir, tmp_path):
    from lightningdot.errors import ConfigMismatchError

    _, student = student_of(teacher_dir, corpus_dir)
    save_model(tmp_path / "student", student)
    assert model_identity(load_model(tmp_path / "student")) == model_identity(student)

    teacher = load_model(teacher_dir)
    with torch.no_grad():
        teacher.image.proj.weight.add_(0.01)
    save_model(teacher_dir, teacher)
    with pytest.raises(ConfigMismatchError, match="trained against another"):
        load_model(tmp_path / "student")


def test_mixed_precision_vectors_stay_close_to_float32(teacher_dir, corpus_dir):
    _, student = student_of(teacher_dir, corpus_dir)
    captions = read_karpathy(corpus_dir / "captions.json").captions
    student.eval()
    with torch.no_grad():
        full = student.encode_text(captions)
        with mixed_precision("cpu", True):
            mixed = student.encode_text(captions).float()
        with mixed_precision("cpu", False):
            same = student.encode_text(captions)
    assert torch.equal(same, full)
    assert not torch.equal(mixed, full)  # bfloat16 did run
    assert (mixed * full).sum(-1).min() > 0.99


def partial(corpus_dir, tmp_path, name: str, keep: int, captions: int) -> str:
    """The tiny corpus in 'another language' (reversed words) for the first `keep` images of
    each split, with `captions` captions each."""
    data = json.loads((corpus_dir / "captions.json").read_text())
    kept = []
    for split in ("train", "val"):
        ims = [im for im in data["images"] if im["split"] == split][:keep]
        for im in ims:
            im["sentences"] = [
                dict(s, raw=" ".join(reversed(s["raw"].split())))
                for s in im["sentences"][:captions]
            ]
        kept += ims
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"images": kept}))
    return str(path)


def tiny_align(teacher_dir, corpus_dir, store_dir, annotations, **overrides) -> AlignConfig:
    size = BertSize(hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64)
    return AlignConfig(
        teacher=str(teacher_dir),
        text=TextConfig(pretrained=None, size=size, trainable_layers=3, max_length=16),
        annotations=[str(corpus_dir / "captions.json"), *annotations],
        features=str(store_dir),
        loop=LoopConfig(epochs=1, batch_size=4, lr=1e-3),
        cross_distill=1.0,
        **overrides,
    )


def test_languages_that_cover_part_of_the_images_train_and_validate_on_their_own(
    corpus_dir, store_dir, teacher_dir, tmp_path
):
    from lightningdot.training.align import AlignTask

    few = partial(corpus_dir, tmp_path, "few", keep=5, captions=1)
    cfg = tiny_align(teacher_dir, corpus_dir, store_dir, [few])
    task = AlignTask(cfg)
    few_lang = task.train_split.languages[1]
    assert few_lang.rows.tolist() == [0, 1, 2, 3, 4] and len(task.val_split.languages[1].rows) == 4
    gen = torch.Generator().manual_seed(0)
    for idx, rows, picks in task.batches(0, gen):
        # Each language's captions are of its own images in the batch, in the batch's order.
        assert rows[0].tolist() == list(range(len(idx)))
        have = [i for i, k in enumerate(idx.tolist()) if k < 5]
        assert rows[1].tolist() == have
        assert picks[1].tolist() == [idx[i].item() for i in have]  # one caption each: its own
        terms = task.loss_terms((idx, rows, picks), gen)
        assert all(torch.isfinite(v) for v in terms.values())
    best = align(cfg, tmp_path / "run", log=lambda _: None)
    assert set(best["languages"]) == {"captions", "few"}


def test_a_language_with_no_image_in_a_batch_adds_nothing():
    e = torch.eye(2)
    none = torch.zeros(0, 2)
    out = align_losses(
        [e, none], e, torch.tensor(0.0), e, ["en", "xx"], e, [torch.arange(2), torch.arange(0)]
    )
    assert out["cmr_xx"] == 0 and out["distill_xx"] == 0 and torch.isfinite(out["cmr_en"])


def test_images_missing_from_the_store_are_counted_and_named(
    corpus_dir, store_dir, teacher_dir, tmp_path
):
    from lightningdot.errors import DataError
    from lightningdot.training.align import AlignTask

    data = json.loads((corpus_dir / "captions.json").read_text())
    for n in range(3):
        data["images"].append(dict(data["images"][0], filename=f"gone{n}.png", split="train"))
    path = tmp_path / "more.json"
    path.write_text(json.dumps(data))
    cfg = tiny_align(teacher_dir, corpus_dir, store_dir, [str(path)])
    with pytest.raises(DataError, match=r"more.json: 3 of its 11 train images are not in the"):
        AlignTask(cfg)


def second_stage(teacher_dir, corpus_dir, store_dir, tmp_path, **overrides) -> AlignConfig:
    """A first student trained on the first language, then a recipe continuing it with a
    second language covering 6 of the images."""
    first = tiny_align(teacher_dir, corpus_dir, store_dir, [])
    align(first, tmp_path / "first", log=lambda _: None)
    few = partial(corpus_dir, tmp_path, "few", keep=6, captions=2)
    return tiny_align(
        teacher_dir,
        corpus_dir,
        store_dir,
        [few],
        init_from=str(tmp_path / "first" / "best"),
        **overrides,
    )


def test_continuing_from_a_student_trains_only_its_top_layers(
    corpus_dir, store_dir, teacher_dir, tmp_path
):
    from lightningdot.errors import ConfigMismatchError

    then = second_stage(teacher_dir, corpus_dir, store_dir, tmp_path, train_layers=1)
    align(then, tmp_path / "then", log=lambda _: None)
    before = load_model(tmp_path / "first" / "best").text.state_dict()
    after = load_model(tmp_path / "then" / "best").text.state_dict()
    for name, tensor in before.items():
        trained = name.startswith(("bert.encoder.layer.2.", "proj.", "pooled_proj."))
        assert torch.equal(tensor, after[name]) != trained, name

    other = dataclasses.replace(then, text=dataclasses.replace(then.text, max_length=12))
    with pytest.raises(ConfigMismatchError, match="init_from model .* max_length"):
        align(other, tmp_path / "other", log=lambda _: None)


def test_a_student_whose_image_encoder_trains_has_an_image_side_and_index_of_its_own(
    corpus_dir, store_dir, teacher_dir, tmp_path
):
    cfg = second_stage(teacher_dir, corpus_dir, store_dir, tmp_path, train_image=True)
    align(cfg, tmp_path / "joint", log=lambda _: None)
    teacher, joint = load_model(teacher_dir), load_model(tmp_path / "joint" / "best")
    assert joint.cfg.image_from == "" and joint.bank is None
    assert index_identity(joint) == model_identity(joint) != model_identity(teacher)
    changed = [
        name
        for (name, a), (_, b) in zip(
            teacher.image.state_dict().items(), joint.image.state_dict().items(), strict=True
        )
        if not torch.equal(a, b)
    ]
    assert changed  # it learned
    # Its validation encoded the images with its own image encoder: the figures in the log
    # are what evaluating the saved model gives.
    from lightningdot.training.align import AlignTask, evaluate_languages

    task = AlignTask(cfg)
    task.student = joint
    got = evaluate_languages(joint, task.val_split, task.store)
    log = [json.loads(x) for x in (tmp_path / "joint" / "log.jsonl").read_text().splitlines()]
    assert got["ar"] == pytest.approx(log[-1]["val"]["ar"], abs=1e-4)

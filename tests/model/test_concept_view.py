"""The concept view in a model's vectors, each piece against a plain reference: the text
branch against HF's own forward, the image side against a loop, the scores against
main + gate * z-score; saving and loading; old indexes; the ONNX graph."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from lightningdot.config import ConceptConfig
from lightningdot.errors import ConfigMismatchError
from lightningdot.features import collate_regions, create_backbone
from lightningdot.model.checkpoint import attach_concepts, load_model, model_identity
from lightningdot.model.concepts import ConceptView
from lightningdot.model.encoders import BiEncoder
from lightningdot.retrieval import Retriever
from tests.helpers import NUM_CLASSES, ColourBackbone, concept_view, tiny_model_config

D = 8  # the sentence space of a tiny view without a text branch
CAPTIONS = ["a red picture", "something green and blue", "x"]
CFG = ConceptConfig(top=3, temperature=2.0, text_weight=0.5, gate_slope=4.0, gate_shift=0.1)


def tiny_view(model: BiEncoder | None = None, seed: int = 0) -> ConceptView:
    """A seeded view over the test backbone's 10 classes; with `model`, a text branch above
    its text encoder's first layer (as the packaged encoder's top layers would be), whose
    sentence space is then the encoder's hidden size."""
    if model is None:
        return concept_view(CFG, D, seed)
    g = torch.Generator().manual_seed(seed + 1)
    layers = copy.deepcopy(model.text.bert.encoder.layer[1:])
    with torch.no_grad():  # differ from the encoder's own layer, as a packaged one would
        for p in layers.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return concept_view(CFG, model.cfg.text.size.hidden_size, seed, layers, branch=1)


def branch_model() -> BiEncoder:
    """A tiny seeded model with a view that branches off its text encoder."""
    torch.manual_seed(3)
    model = BiEncoder(tiny_model_config())
    model.init_pretrained()
    model.eval()
    model.concepts = tiny_view(model)
    return model


def regions(n: int = 3):
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(n, 3, 8, 8, generator=g) * 255
    return collate_regions(ColourBackbone()(pixels))


def naive_sentence(model: BiEncoder, texts: list[str]) -> torch.Tensor:
    """The packaged encoder's sentence embedding by HF's forward: the text encoder with its
    layers above the branch replaced by the view's."""
    ref = copy.deepcopy(model.text.bert)
    ref.encoder.layer = torch.nn.ModuleList(
        [*ref.encoder.layer[: model.concepts.branch], *model.concepts.text_layers]
    )
    batch = model.tokenize(texts)
    states = ref(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((states * m).sum(1) / m.sum(1), dim=-1)


def naive_concepts(view: ConceptView, batch) -> torch.Tensor:
    """Each image alone: the top classes of the pooled feature, their names mixed."""
    out = []
    for b in range(len(batch.mask)):
        real = batch.features[b][batch.mask[b].bool()].float()
        probs = (view.classifier(real.mean(0)) / view.cfg.temperature).softmax(-1)
        p, c = probs.topk(view.cfg.top)
        out.append(
            F.normalize(sum(w * view.names[i] for w, i in zip(p / p.sum(), c, strict=True)), dim=0)
        )
    return torch.stack(out)


@torch.inference_mode()
def test_text_coordinates_match_the_packaged_forward_and_keep_the_main_vector():
    model = branch_model()
    full = model.encode_text(CAPTIONS)
    main = model.cfg.vector_dim
    assert full.shape == (3, main + model.concepts.dim)
    view, model.concepts = model.concepts, None
    torch.testing.assert_close(full[:, :main], model.encode_text(CAPTIONS))
    model.concepts = view
    s = naive_sentence(model, CAPTIONS)
    sd = ((s @ model.concepts.cov) * s).sum(-1, keepdim=True).sqrt()
    torch.testing.assert_close(full[:, main:], s / sd, atol=1e-5, rtol=1e-4)


@torch.inference_mode()
def test_scores_are_the_main_score_plus_a_gated_z_score():
    model = branch_model()
    view, main = model.concepts, model.cfg.vector_dim
    batch = regions()
    text, image = model.encode_text(CAPTIONS), model.encode_image(batch)
    c = naive_concepts(view, batch)
    torch.testing.assert_close(image[:, main:], c - view.mean, atol=1e-5, rtol=1e-4)
    s = naive_sentence(model, CAPTIONS)
    z = (s @ (c - view.mean).T) / ((s @ view.cov) * s).sum(-1, keepdim=True).sqrt()
    best = (s @ view.names.T).max(-1).values
    gate = CFG.text_weight * torch.sigmoid(CFG.gate_slope * (best - CFG.gate_shift))
    want = text[:, :main] @ image[:, :main].T + gate[:, None] * z
    got = model.score(model.as_query(text, "text"), image)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    i2t = model.score(model.as_query(image, "image"), text)
    want_i2t = image[:, :main] @ text[:, :main].T + CFG.image_weight * z.T
    torch.testing.assert_close(i2t, want_i2t, atol=1e-5, rtol=1e-4)


def test_training_sees_the_main_vectors_alone():
    model = branch_model()
    assert model.encode_text(CAPTIONS).shape[1] == model.cfg.vector_dim
    assert not any(n.startswith("concepts.") for n in model.stored_state())


def test_a_view_whose_names_do_not_fit_the_classifier_is_refused():
    names = torch.zeros(NUM_CLASSES + 1, D)
    classifier = create_backbone("test-colour").classifier()
    with pytest.raises(ConfigMismatchError, match="11 classes.*has 10"):
        ConceptView(CFG, classifier, names, torch.zeros(D), torch.eye(D))


def test_saved_view_loads_with_the_same_identity_and_vectors(model_dir):
    plain = load_model(model_dir)
    attach_concepts(model_dir, tiny_view())
    model = load_model(model_dir)
    assert model_identity(model) == model_identity(plain)
    assert model.vector_dim == plain.vector_dim + D
    with torch.inference_mode():
        batch = regions()
        image = model.encode_image(batch)
        torch.testing.assert_close(image[:, : plain.vector_dim], plain.encode_image(batch))
        # No branch into this text encoder (not the packaged one): its coordinates are 0.
        assert model.encode_text(CAPTIONS)[:, plain.vector_dim :].abs().max() == 0


def test_a_view_of_another_class_name_file_is_refused_at_load(model_dir):
    attach_concepts(model_dir, tiny_view())
    saved = json.loads((model_dir / "config.json").read_text())
    saved["concepts"]["names_sha256"] = "0" * 64
    (model_dir / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigMismatchError, match="another class-name file"):
        load_model(model_dir)


def test_an_index_built_before_the_view_is_searched_by_the_main_vectors(index_dir, tmp_path):
    before = Retriever.open(index_dir, tmp_path / "model").search_text(CAPTIONS[:1], k=4)
    attach_concepts(tmp_path / "model", tiny_view())
    with pytest.warns(UserWarning, match="without the model's concept view"):
        retriever = Retriever.open(index_dir, tmp_path / "model")
    assert retriever.model.concepts is None
    after = retriever.search_text(CAPTIONS[:1], k=4)
    assert [(r.id, round(r.score, 5)) for r in after[0].results] == [
        (r.id, round(r.score, 5)) for r in before[0].results
    ]
    images = retriever.search_image([tmp_path / "images" / "img00.png"], k=2)
    assert len(images[0].results) == 2


def test_an_index_built_with_the_view_scores_main_plus_view_plus_main_prior(corpus_dir, tmp_path):
    from lightningdot.data import read_karpathy
    from lightningdot.features import load_image
    from lightningdot.index.build import build_index
    from lightningdot.index.engines import open_index
    from lightningdot.model.prior import QueryBank, hub_prior

    model = branch_model()
    main = model.cfg.vector_dim
    g = torch.Generator().manual_seed(2)
    bank = QueryBank(*(F.normalize(torch.randn(5, main, generator=g), dim=-1) for _ in "ti"), 4.0)
    model.bank = bank  # in the main space, as `ldot bank` makes it
    corpus = read_karpathy(corpus_dir / "captions.json", "train")
    build_index(model, "tiny", corpus, corpus_dir / "images", tmp_path / "ix2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        retriever = Retriever(model, open_index(tmp_path / "ix2", model))
    assert retriever.image_index.dim == model.vector_dim
    hits = retriever.search_text(CAPTIONS[:1], k=len(corpus.images))[0].results
    backbone = ColourBackbone()
    with torch.inference_mode():
        pixels = [backbone.preprocess(load_image(corpus_dir / "images" / h.id)) for h in hits]
        items = model.encode_image(collate_regions(backbone(torch.stack(pixels))))
        q = model.as_query(model.encode_text(CAPTIONS[:1]), "text")[0]
    concept = items[:, main:] @ q[main:]
    assert concept.abs().max() > 1e-3  # the view counts in these scores
    want = items[:, :main] @ q[:main] + concept + hub_prior(items[:, :main], bank.text, 4.0)
    torch.testing.assert_close(torch.tensor([h.score for h in hits]), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("branches", [True, False], ids=["branch", "image side only"])
def test_the_onnx_graph_carries_the_view_at_any_batch_size(branches, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from lightningdot import runtime
    from lightningdot.config import RuntimeConfig

    monkeypatch.setenv("LDOT_CACHE", str(tmp_path / "cache"))
    model = branch_model()
    if not branches:  # as a multilingual model holds its image side's view
        model.concepts = model.concepts.image_side()
    with torch.inference_mode():
        eager = model.encode_text(CAPTIONS)
        runtime.accelerate(model, RuntimeConfig("onnx", threads=1))
        assert model.fast_text is not None
        fast = model.encode_text(CAPTIONS)
    torch.testing.assert_close(fast, eager, atol=1e-4, rtol=1e-3)

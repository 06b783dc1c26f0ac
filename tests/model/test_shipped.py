"""The shipped default model and re-ranker: compact, loadable, and the demo runs with them."""

import torch
from safetensors import safe_open

from lightningdot.demo import run_demo
from lightningdot.model.checkpoint import (
    load_model,
    load_reranker,
    read_folder_config,
    read_model_config,
)
from lightningdot.model.shipped import shipped_dir

BUDGET_BYTES = 80 * 10**6  # all shipped weights of the project together


def test_shipped_weights_are_half_precision_and_within_budget():
    weights_root = shipped_dir("model", "default").parent
    files = list(weights_root.glob("*/*.safetensors"))  # weights and query banks
    assert len(files) >= 2, "the default model and its re-ranker ship in the package"
    assert sum(f.stat().st_size for f in files) <= BUDGET_BYTES
    for f in files:
        with safe_open(f, "pt") as st:
            assert all(str(st.get_slice(k).get_dtype()) in ("F16", "BF16") for k in st.keys())
    cfg, meta = read_model_config(shipped_dir("model", "default"))
    assert cfg.text.pretrained == "all-minilm-l6-v2"  # frozen parts come from the package
    assert "val" in meta  # the figures it was chosen on travel with it
    assert "val" in read_folder_config(shipped_dir("reranker", "default"), "reranker")


def test_default_model_and_reranker_load_and_agree():
    model = load_model()  # no name: the default
    with torch.inference_mode():
        t = model.encode_text(["a dog runs on the grass", "a plate of food on a table"])
    main = t[:, : model.cfg.vector_dim]  # then the concept view's coordinates
    assert torch.allclose(main.norm(dim=-1), torch.ones(2), atol=1e-4)
    assert model.bank is not None  # its indexes rank with the query-bank prior
    assert model.bank.text.shape[1] == model.bank.image.shape[1] == model.cfg.vector_dim
    reranker = load_reranker("default", bi=model)  # refuses a bi-encoder it was not trained on
    assert reranker.bi is model


def test_demo_ranks_the_obvious_photos_first():
    results, info = run_demo(k=3)
    assert info["images"] >= 10
    by_query = {r.query: r for r in results}
    assert by_query["a brown horse standing in a field"].hits[0].name == "horse.png"
    assert by_query["a motorcycle parked indoors"].hits[0].name == "motorcycle_left.png"
    # Objects Flickr8k's captions hardly name: the concept view finds them (without it, the
    # model ranks coffee.png, retina.jpg and astronaut.png first).
    assert by_query["a cat"].hits[0].name == "chelsea.png"
    assert by_query["a rocket"].hits[0].name == "rocket.jpg"
    assert by_query["a clock"].hits[0].name == "clock_motion.png"
    image = results[-1]
    assert image.query == "[image] motorcycle_left.png"
    assert image.hits[0].name == "caption: a motorcycle parked indoors"


def test_multilingual_model_shares_the_default_index_and_aligns_languages():
    from lightningdot.model.checkpoint import index_identity

    default, multi = load_model("default"), load_model("multilingual")
    assert index_identity(multi) == index_identity(default)  # same image index serves both
    # It ships its text side alone; image encoder and query bank are the default's.
    assert multi.cfg.image_from == "default"
    assert torch.equal(multi.bank.text, default.bank.text)
    assert torch.equal(multi.bank.image, default.bank.image)
    with safe_open(shipped_dir("model", "multilingual") / "model.safetensors", "pt") as f:
        assert all(k.startswith("text.") for k in f.keys())
    with torch.inference_mode():
        zh, en, other = multi.encode_text(
            ["一只狗在草地上奔跑", "a dog runs on the grass", "a plate of food on a table"]
        )
    assert float(zh @ en) > 0.8 > float(zh @ other)


def test_demo_with_the_multilingual_model_answers_other_languages():
    results, _ = run_demo("multilingual", k=3)
    by_query = {r.query: r for r in results}
    assert by_query["一匹棕色的马站在田野里"].hits[0].name == "horse.png"
    assert by_query["Una motocicleta estacionada"].hits[0].name == "motorcycle_left.png"
    assert by_query["Ein Mann mit einer Kamera"].hits[0].name == "camera.png"
    assert by_query["Une personne en veste rouge"].hits[0].name == "astronaut.png"
    assert by_query["Motorka zaparkovaná uvnitř"].hits[0].name == "motorcycle_left.png"
    assert by_query["a brown horse 在田野里"].hits[0].name == "horse.png"  # code-switched
    # Portuguese finds the coffee, but ranks it third (after the bricks and the camera).
    assert "coffee.png" in [h.name for h in by_query["Uma xícara de café sobre a mesa"].hits]

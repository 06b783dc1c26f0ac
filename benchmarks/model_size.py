"""Cost of the model sizes we could choose: training pairs/s and query latency per configuration.

Times a CMR training step (batch 128, 81 regions of 1280-d, a 17-token caption) and the online
encoders (one caption; one image's regions) for several image-encoder depths and numbers of
fine-tuned text layers. Inputs are synthetic: only the cost is measured here, not accuracy.

    python benchmarks/model_size.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from report import commit, machine, table, write_section

from lightningdot.config import ImageConfig, ModelConfig, TextConfig, TrainConfig
from lightningdot.features import RegionBatch, grid_boxes
from lightningdot.model.encoders import BiEncoder
from lightningdot.training.pretrain import PretrainingModel, param_groups, weighted_loss

CAPTION = "A little girl in a pink dress going into a wooden cabin ."


def regions(b: int) -> RegionBatch:
    g = torch.Generator().manual_seed(0)
    return RegionBatch(
        torch.rand(b, 81, 1280, generator=g) * 4,
        grid_boxes(9, 9).expand(b, 81, 7).clone(),
        torch.ones(b, 81, dtype=torch.bool),
    )


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(image_layers: int, text_layers: int, batch: int, repeats: int) -> list[str]:
    cfg = TrainConfig(
        model=ModelConfig(
            text=TextConfig(trainable_layers=text_layers),
            image=ImageConfig(num_layers=image_layers),
        )
    )
    model = BiEncoder(cfg.model)
    model.init_pretrained()
    module = PretrainingModel(model, cfg)
    opt = torch.optim.AdamW(param_groups(module, cfg))
    tokens, reg = model.tokenize([CAPTION] * batch), regions(batch)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        loss = weighted_loss(module(tokens, reg, gen), cfg.objectives)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step_s = median_time(step, repeats)
    model.eval()
    one = regions(1)
    with torch.inference_mode():
        text_ms = 1e3 * median_time(lambda: model.encode_text([CAPTION]), 20)
        image_ms = 1e3 * median_time(lambda: model.encode_image(one), 20)
    stored = sum(p.numel() for p in model.stored_state().values())
    return [
        str(image_layers),
        str(text_layers),
        f"{stored / 1e6:.1f}",
        f"{batch / step_s:.1f}",
        f"{text_ms:.1f}",
        f"{image_ms:.1f}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = [measure(i, t, args.batch, args.repeats) for i, t in [(1, 6), (2, 6), (4, 6), (2, 2)]]
    header = [
        "image layers",
        "fine-tuned text layers",
        "stored params (M)",
        "train pairs/s",
        "encode 1 caption (ms)",
        "encode 1 image (ms)",
    ]
    body = "\n".join(
        [
            "## Model size vs cost",
            "",
            f"Machine: {machine()}; commit {commit()}. CMR step at batch {args.batch}, median of "
            f"{args.repeats}; encoders median of 20. Reproduce: `python benchmarks/model_size.py`.",
            "",
            table(header, rows),
        ]
    )
    write_section("model-size", body)
    print(body)


if __name__ == "__main__":
    main()

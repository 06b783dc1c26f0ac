"""Training step time in float32 against bfloat16 autocast, on this machine.

`bf16 = true` in a recipe is a request: on a CPU that only emulates bfloat16 (no AVX512-BF16
or AMX), training runs in float32 instead. This measures what the request would cost or save:
one step (forward, backward) of the shipped `multilingual` text encoder over a batch of real
Flickr8k captions, as `ldot align` takes it, with the autocast training would use and with
none. The bfloat16 row is timed even where training would not take it.

    python benchmarks/precision.py [--batch 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from report import commit, machine, table, write_section

from lightningdot.data import read_karpathy
from lightningdot.model.checkpoint import load_model
from lightningdot.precision import mixed_precision, native_bf16

ROOT = Path(__file__).resolve().parent.parent


def step_seconds(model, captions: list[str], bf16: bool, repeats: int) -> float:
    """Median seconds of forward + backward of the text encoder over `captions`."""
    batch = model.tokenize(captions)
    times = []
    for i in range(repeats + 1):  # the first is a warm-up
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with mixed_precision(model, bf16):
            vectors = model.encode_text(batch).float()
        # A loss with gradients into every layer, like CMR's: spread of the batch's vectors.
        (vectors @ vectors.T).logsumexp(1).mean().backward()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/flickr8k")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    english = read_karpathy(args.data / "dataset_flickr8k.json", "train").captions
    chinese = read_karpathy(args.data / "dataset_flickr8kcn.json", "train").captions
    torch.manual_seed(0)
    model = load_model("multilingual").train()  # trainable as its recipe says: all 12 layers

    rows = []
    for language, captions in [("English", english), ("Chinese", chinese)]:
        picked = [captions[i] for i in torch.randperm(len(captions))[: args.batch].tolist()]
        fp32_s, bf16_s = (step_seconds(model, picked, b, args.repeats) for b in (False, True))
        rows.append(
            [language, f"{1e3 * fp32_s:.0f}", f"{1e3 * bf16_s:.0f}", f"{bf16_s / fp32_s:.2f}"]
        )
    native = native_bf16("cpu")
    body = "\n".join(
        [
            "## Training step: float32 against bfloat16 autocast",
            "",
            f"Machine: {machine()}; commit {commit()}. Forward + backward of the shipped "
            f"`multilingual` text encoder (12 layers) over {args.batch} Flickr8k train captions, "
            f"median of {args.repeats} after a warm-up. Reproduce: `python benchmarks/precision.py`.",
            "",
            table(["captions", "float32 ms", "bf16 autocast ms", "bf16 / float32"], rows),
            "",
            f"- Native bfloat16 on this CPU (AVX512-BF16 or AMX): {'yes' if native else 'no'}; "
            f"so a recipe's `bf16 = true` trains in {'bfloat16' if native else 'float32'} here.",
        ]
    )
    write_section("precision", body)
    print(body)


if __name__ == "__main__":
    main()

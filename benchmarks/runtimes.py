"""Which inference runtime encodes a text query fastest on this machine, side by side in one run.

The shipped text encoder (`load_model("default")`: MiniLM-L6 + projections + normalisation) run
from token tensors, tokenised outside the timed region, by:

- eager PyTorch under `torch.inference_mode` (the reference), with 1 and with 2 torch threads;
- `torch.compile` (inductor, dynamic shapes), when it works on this build;
- torch dynamic int8 quantisation of the Linear layers (`quantize_dynamic`);
- ONNX Runtime on a `torch.onnx.export` of the same graph (dynamic batch and sequence axes),
  with 1 and 2 intra-op threads, and on its dynamic int8 quantisation
  (`onnxruntime.quantization.quantize_dynamic`).

For each: the cosine of its vectors to eager's on val captions of Flickr8k (padded batches of
32, as the real path pads), one query (batch 1) p50/p99 latency, and captions/s at batch 8 and
32. The tokeniser is timed on its own. With `--images`, the EfficientNet-Lite2 backbone too:
eager against ONNX Runtime, images/s at batch 32.

    pip install onnxruntime onnx onnxscript
    python benchmarks/runtimes.py [--no-write] [--images] [--captions 200] [--runs 200]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from report import commit, machine, table, write_section
from torch import nn

from lightningdot.model.checkpoint import load_model
from lightningdot.runtime import (
    GridGraph,
    OnnxFunction,
    TextGraph,
    export_onnx,
    quantize_onnx,
)

ROOT = Path(__file__).resolve().parent.parent

# (input_ids, attention_mask), each (B, T) int64 -> (B, D) unit vectors
Encode = Callable[[torch.Tensor, torch.Tensor], np.ndarray]


@dataclass
class Runtime:
    name: str
    threads: int  # torch threads, or ONNX Runtime intra-op threads
    encode: Encode
    setup_s: float  # export / quantise / compile time, before the first call


def torch_runtime(name: str, module: nn.Module, threads: int, setup_s: float = 0.0) -> Runtime:
    def encode(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        with torch.inference_mode():
            return module(input_ids, attention_mask).numpy()

    return Runtime(name, threads, encode, setup_s)


def ort_runtime(name: str, path: Path, threads: int, setup_s: float) -> Runtime:
    """A session as `lightningdot.runtime` opens one (its thread settings included)."""
    session = OnnxFunction(str(path), threads)

    def encode(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
        return session(input_ids, attention_mask).numpy()

    return Runtime(name, threads, encode, setup_s)


def export_text(graph: nn.Module, example: dict[str, torch.Tensor], path: Path) -> None:
    """ONNX of `graph` with dynamic batch and sequence axes, as `lightningdot.runtime` exports it
    (the example batch holds padding, so the traced graph keeps the attention mask)."""
    from torch.export import Dim

    seq = {0: Dim("batch", min=1, max=4096), 1: Dim("seq", min=2, max=512)}
    names = ["input_ids", "attention_mask"]
    export_onnx(
        graph,
        (example["input_ids"], example["attention_mask"]),
        names,
        dict.fromkeys(names, seq),
        path,
    )


def candidates(graph: nn.Module, example: dict, workdir: Path) -> tuple[list[Runtime], list[str]]:
    """Every runtime that could be built, and a note for each that could not."""
    runtimes = [torch_runtime("eager", graph, t) for t in (1, 2)]
    failed = []

    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = torch.ao.quantization.quantize_dynamic(
                copy.deepcopy(graph), {nn.Linear}, dtype=torch.qint8
            )
        runtimes += [
            torch_runtime("torch int8 (dynamic)", q, t, time.perf_counter() - t0) for t in (1, 2)
        ]
    except Exception as e:  # noqa: BLE001 - a runtime that cannot be built is a result
        failed.append(f"torch int8: {type(e).__name__}: {str(e)[:200]}")

    for threads in (1, 2):
        # Inductor's C++ kernels take the thread count in force when they are compiled.
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        try:
            compiled = torch.compile(copy.deepcopy(graph), dynamic=True)
            torch_runtime("x", compiled, threads).encode(**example)
            setup = time.perf_counter() - t0
            runtimes.append(torch_runtime("torch.compile", compiled, threads, setup))
        except Exception as e:  # noqa: BLE001
            failed.append(f"torch.compile: {type(e).__name__}: {str(e)[:200]}")
            break

    fp32, int8 = workdir / "text.onnx", workdir / "text.int8.onnx"
    t0 = time.perf_counter()
    try:
        export_text(graph, example, fp32)
        export_s = time.perf_counter() - t0
        runtimes += [ort_runtime("onnxruntime", fp32, t, export_s) for t in (1, 2)]
        t0 = time.perf_counter()
        quantize_onnx(fp32, int8)
        quant_s = export_s + time.perf_counter() - t0
        runtimes += [ort_runtime("onnxruntime int8 (dynamic)", int8, t, quant_s) for t in (1, 2)]
    except Exception as e:  # noqa: BLE001
        failed.append(f"onnxruntime: {type(e).__name__}: {str(e)[:200]}")
    return runtimes, failed


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def latency_ms(fn: Callable[[], object], runs: int, warmup: int = 20) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def measure(
    runtimes: list[Runtime], singles: list[dict], chunks: dict[int, list[dict]], runs: int
) -> list[dict]:
    """Batch-1 latency over `runs` queries (cycling through the captions) and captions/s per
    batch size, for every runtime.

    The runtimes take turns in rounds (a block of queries, or one pass over the captions, each),
    so that load from other processes on the machine falls on all of them alike.
    """
    rounds, block = max(1, runs // 25), min(runs, 25)
    lat: list[list[float]] = [[] for _ in runtimes]
    for rt in runtimes:  # warm-up: every shape a runtime will see
        for b in singles[:20] + [c[0] for c in chunks.values()]:
            rt.encode(**b)
    for r in range(rounds):
        for i, rt in enumerate(runtimes):
            for k in range(block):
                b = singles[(r * block + k) % len(singles)]
                t0 = time.perf_counter()
                rt.encode(**b)
                lat[i].append(1e3 * (time.perf_counter() - t0))
    res = [{"p50_ms": percentile(x, 50), "p99_ms": percentile(x, 99)} for x in lat]
    for size, batches in chunks.items():
        spent = [0.0] * len(runtimes)
        for _ in range(2):
            for i, rt in enumerate(runtimes):
                t0 = time.perf_counter()
                for b in batches:
                    rt.encode(**b)
                spent[i] += time.perf_counter() - t0
        n = 2 * sum(b["input_ids"].shape[0] for b in batches)
        for i in range(len(runtimes)):
            res[i][f"per_s_b{size}"] = n / spent[i]
    return res


def cosines(rt: Runtime, batches: list[dict], reference: np.ndarray) -> tuple[float, float]:
    """Mean and minimum cosine of `rt`'s vectors to the reference's, caption by caption."""
    got = np.concatenate([rt.encode(b["input_ids"], b["attention_mask"]) for b in batches])
    got = got / np.linalg.norm(got, axis=1, keepdims=True)
    cos = (got * reference).sum(1)
    return float(cos.mean()), float(cos.min())


def val_captions(data: Path, n: int) -> list[str]:
    """The first caption of each of the first `n` val images."""
    js = json.loads((data / "dataset_flickr8k.json").read_text())
    return [im["sentences"][0]["raw"] for im in js["images"] if im["split"] == "val"][:n]


def image_side(data: Path, workdir: Path, n: int) -> tuple[list[list[str]], str]:
    """EfficientNet-Lite2: eager against ONNX Runtime, images/s at batch 32, cosine of cells."""
    from PIL import Image

    from lightningdot.features import create_backbone

    backbone = create_backbone("efficientnet-lite2")
    graph = GridGraph(backbone).eval()
    js = json.loads((data / "dataset_flickr8k.json").read_text())
    files = [im["filename"] for im in js["images"] if im["split"] == "val"][:n]
    pixels = torch.stack(
        [backbone.preprocess(Image.open(data / "images" / f).convert("RGB")) for f in files]
    )  # (n, 3, 260, 260)
    path = workdir / "lite2.onnx"
    t0 = time.perf_counter()
    dims = {"pixels": {0: torch.export.Dim("batch", min=1, max=4096)}}
    export_onnx(graph, (pixels[:2],), ["pixels"], dims, path)
    export_s = time.perf_counter() - t0
    sessions = {threads: OnnxFunction(str(path), threads) for threads in (1, 2)}

    def eager(x: torch.Tensor, threads: int) -> np.ndarray:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            return graph(x).flatten(2).transpose(1, 2).numpy()

    def onnx(x: torch.Tensor, threads: int) -> np.ndarray:
        return sessions[threads](x).flatten(2).transpose(1, 2).numpy()

    batches = list(pixels.split(32))
    rows, ref = [], None
    for name, fn, setup in (("eager", eager, 0.0), ("onnxruntime", onnx, export_s)):
        for threads in (1, 2):
            fn(batches[0], threads)  # warm-up
            t0 = time.perf_counter()
            cells = np.concatenate([fn(b, threads) for b in batches])  # (n, h*w, 1280)
            per_s = n / (time.perf_counter() - t0)
            flat = cells.reshape(-1, cells.shape[-1])
            flat = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
            ref = flat if ref is None else ref
            cos = (flat * ref).sum(1)
            row = [name, str(threads), f"{per_s:.1f}", f"{cos.mean():.6f}", f"{setup:.1f}"]
            rows.append(row)
            print(row, flush=True)
    return rows, f"{n} val images, {pixels.shape[-1]}x{pixels.shape[-1]}, batches of 32"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/flickr8k")
    ap.add_argument("--captions", type=int, default=200)
    ap.add_argument("--runs", type=int, default=200, help="batch-1 queries timed per runtime")
    ap.add_argument("--images", action="store_true", help="also time the image backbone")
    ap.add_argument("--image-count", type=int, default=64)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    max_threads = torch.get_num_threads()

    model = load_model("default").eval()
    graph = TextGraph(model).eval()
    captions = val_captions(args.data, args.captions)

    tok = latency_ms(lambda: model.tokenize([captions[0]]), args.runs)
    singles = [model.tokenize([c]) for c in captions]
    chunks = {
        s: [model.tokenize(captions[i : i + s]) for i in range(0, len(captions), s)]
        for s in (8, 32)
    }
    with torch.inference_mode():
        reference = np.concatenate([graph(**b).numpy() for b in chunks[32]])
        # The graph is encode_text from tensors: check, so every cosine below is to encode_text.
        assert np.allclose(reference[:32], model.encode_text(captions[:32]).numpy(), atol=1e-6)
    torch.set_num_threads(1)
    full = latency_ms(lambda: model.encode_text([captions[0]]), args.runs)

    with tempfile.TemporaryDirectory() as tmp:
        runtimes, failed = candidates(graph, chunks[8][0], Path(tmp))
        load_before = os.getloadavg()[0]
        results = list(zip(runtimes, measure(runtimes, singles, chunks, args.runs), strict=True))
        load_after = os.getloadavg()[0]
        for rt, r in results:
            r["cos_mean"], r["cos_min"] = cosines(rt, chunks[32], reference)
            print(f"{rt.name} x{rt.threads}: {json.dumps(r)}", flush=True)
        image = image_side(args.data, Path(tmp), args.image_count) if args.images else None
    torch.set_num_threads(max_threads)

    rows = [
        [
            rt.name,
            str(rt.threads),
            f"{r['p50_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
            f"{r['per_s_b8']:.0f}",
            f"{r['per_s_b32']:.0f}",
            f"{r['cos_mean']:.6f}",
            f"{r['cos_min']:.6f}",
            f"{rt.setup_s:.1f}",
        ]
        for rt, r in results
    ]
    header = [
        "runtime",
        "threads",
        "b1 p50 ms",
        "b1 p99 ms",
        "caps/s b8",
        "caps/s b32",
        "cos mean",
        "cos min",
        "setup s",
    ]
    best1 = min(results, key=lambda x: x[1]["p50_ms"])
    best32 = max(results, key=lambda x: x[1]["per_s_b32"])
    lines = [
        "## Inference runtimes for the text encoder",
        "",
        f"Machine: {machine()}; commit {commit()}. The shipped text encoder "
        f'(`load_model("default")`) from token tensors, {len(captions)} Flickr8k val captions '
        f"(the first of each image); batch 1: {args.runs} queries after 20 warm-up, each its own "
        "length; cosine to eager PyTorch over padded batches of 32; setup: export / quantise / "
        "compile time. The runtimes take turns in rounds; the machine's 1-minute load average "
        f"was {load_before:.1f} before and {load_after:.1f} after (other processes included). "
        "Reproduce: `python benchmarks/runtimes.py`.",
        "",
        table(header, rows),
        "",
        f"Fastest one query: {best1[0].name} with {best1[0].threads} thread(s), "
        f"{best1[1]['p50_ms']:.2f} ms p50. Most captions/s at batch 32: {best32[0].name} with "
        f"{best32[0].threads} thread(s), {best32[1]['per_s_b32']:.0f}/s. Outside the graph: the "
        f"tokeniser takes {statistics.median(tok):.2f} ms p50 for one caption; "
        f"`encode_text([caption])` (tokeniser + eager, 1 thread) {statistics.median(full):.2f} ms p50.",
    ]
    if failed:
        lines += ["", "Could not be built here: " + "; ".join(failed) + "."]
    if image is not None:
        img_rows, what = image
        lines += [
            "",
            f"Image backbone EfficientNet-Lite2 ({what}); cosine of the cell features to eager's:",
            "",
            table(["runtime", "threads", "images/s b32", "cos mean", "setup s"], img_rows),
        ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("runtimes", body)


if __name__ == "__main__":
    main()

"""`ldot`: one command line, one subcommand per stage. Each command parses its arguments, calls
one library function and prints what it returns (`lightningdot.console`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from lightningdot.console import (
    Bar,
    console,
    print_answers,
    print_bench,
    print_demo,
    print_metrics,
    progress_bar,
    step_reporter,
)
from lightningdot.errors import LightningDotError

app = typer.Typer(
    help="LightningDOT: real-time image-text retrieval.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

Recipe = Annotated[Path, typer.Argument(help="Training recipe (.toml).")]
RunFolder = Annotated[Path, typer.Option(help="Run folder (checkpoints, log); resumed if present.")]
Annotations = Annotated[Path, typer.Option(help="Karpathy-format annotation file.")]
ImagesOf = Annotated[Path, typer.Option(help="Folder of the images it names.")]
ModelName = Annotated[str, typer.Option(help="Shipped model name or model folder.")]
IndexModel = Annotated[
    str | None, typer.Option(help="Model (default: the one that built the index).")
]
RerankerName = Annotated[
    str, typer.Option(help="Shipped re-ranker name or folder (with --rerank).")
]
JsonOut = Annotated[Path | None, typer.Option("--json", help="Write the metrics here.")]


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn errors caused by input into one red line and exit code 2, without a traceback."""
    try:
        yield
    except LightningDotError as e:
        console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2) from None


@app.command()
def extract(
    images: Annotated[Path, typer.Option(help="Folder of the images.")],
    out: Annotated[Path, typer.Option(help="Feature store folder to write (or resume).")],
    annotations: Annotated[
        Path | None, typer.Option(help="Karpathy-format file naming the images.")
    ] = None,
    split: Annotated[str | None, typer.Option(help="Only this split of the annotations.")] = None,
    backbone: Annotated[str, typer.Option(help="Registered backbone.")] = "efficientnet-lite2",
    detector: Annotated[
        bool, typer.Option(help="Import precomputed detector regions (.npz per image).")
    ] = False,
    batch_size: int = 32,
    shard_size: int = 256,
) -> None:
    """Extract region features of a collection into a feature store (resumable)."""
    from lightningdot.features.extract import extract_collection

    with user_errors(), progress_bar() as bar:
        summary = extract_collection(
            images, out, annotations, split, backbone, detector, batch_size, shard_size, Bar(bar)
        )
    console.print(
        f"{summary.extracted} extracted, {summary.skipped} already done, "
        f"{len(summary.failed)} failed, of {summary.total} "
        f"({summary.images_per_second:.1f} images/s) -> {out}"
    )
    for key, reason in summary.failed:
        console.print(f"  [yellow]skipped[/] {key}: {reason}")


def _train(recipe: Path, out: Path, mode: str) -> None:
    from lightningdot.config import TrainConfig, load_config
    from lightningdot.training.pretrain import finetune, train

    run = finetune if mode == "finetune" else train
    with user_errors():
        cfg = load_config(TrainConfig, recipe)
        with progress_bar() as bar:
            best = run(cfg, out, step_reporter(bar, mode, cfg.loop.epochs), bar.console.print)
    if best:
        console.print(f"best val AR {best['ar']:.2f} -> {out / 'best'}")


@app.command()
def pretrain(recipe: Recipe, out: RunFolder) -> None:
    """Pre-train with VMLM + SMRM + CMR, mixed as the recipe says."""
    _train(recipe, out, "pretrain")


@app.command()
def finetune(recipe: Recipe, out: RunFolder) -> None:
    """Fine-tune with CMR (from `init_from` in the recipe, or from the pretrained encoders)."""
    _train(recipe, out, "finetune")


@app.command()
def bank(
    model: Annotated[
        Path, typer.Argument(help="Model folder to give a bank (e.g. runs/NAME/best).")
    ],
    annotations: Annotated[Path, typer.Option(help="Karpathy-format file the model trained on.")],
    features: Annotated[Path, typer.Option(help="Feature store of its images.")],
    split: Annotated[
        str, typer.Option(help="Split to draw the bank from (not one you evaluate on).")
    ] = "train",
    size: Annotated[int, typer.Option(help="Captions, and images, in the bank.")] = 2000,
    beta: Annotated[
        float, typer.Option(help="Inverse temperature of the inverted softmax.")
    ] = 10.0,
    seed: Annotated[int, typer.Option(help="Seed of the draw.")] = 0,
) -> None:
    """Give a model a query bank: indexes it builds then rank by dot product plus a per-item prior
    that discounts hubs (an inverted softmax over the bank; see `lightningdot.model.prior`)."""
    from lightningdot.training.bank import give_bank

    with user_errors():
        made = give_bank(model, annotations, features, split, size, beta, seed)
    console.print(
        f"wrote {model / 'bank.safetensors'}: {len(made.text)} captions and "
        f"{len(made.image)} images of {annotations.name} [{split}], beta {beta:g}"
    )


@app.command()
def align(
    recipe: Annotated[Path, typer.Argument(help="TOML recipe (see recipes/multilingual.toml).")],
    out: Annotated[Path, typer.Option(help="Run folder: best/, last/, log.jsonl.")],
) -> None:
    """Train a text encoder (e.g. multilingual) into an existing model's embedding space,
    keeping its image encoder, so the indexes that model built serve the new one."""
    from lightningdot.config import AlignConfig, load_config
    from lightningdot.training.align import align as run_align

    with user_errors():
        cfg = load_config(AlignConfig, recipe)
        with progress_bar() as bar:
            on_step = step_reporter(bar, "align", cfg.loop.epochs)
            best = run_align(cfg, out, on_step, bar.console.print)
    if best:
        per = ", ".join(f"{k} {m['ar']:.2f}" for k, m in best["languages"].items())
        console.print(f"best mean val AR {best['ar']:.2f} ({per}) -> {out / 'best'}")


@app.command("train-reranker")
def train_reranker(
    recipe: Annotated[Path, typer.Argument(help="Re-ranker recipe (.toml).")],
    out: Annotated[Path, typer.Option(help="Run folder (checkpoints, log).")],
    val_k: Annotated[int, typer.Option(help="Top K re-ranked in validation.")] = 16,
) -> None:
    """Train the cross-attention re-ranker on hard negatives mined by the bi-encoder."""
    from lightningdot.config import RerankTrainConfig, load_config
    from lightningdot.training.reranker import train_reranker as run

    with user_errors():
        cfg = load_config(RerankTrainConfig, recipe)
        with progress_bar() as bar:
            on_step = step_reporter(bar, "re-ranker", cfg.loop.epochs)
            best = run(cfg, out, on_step, log=bar.console.print, val_k=val_k)
    if best:
        console.print(f"best val AR re-ranking the top {val_k}: {best['ar']:.2f} -> {out / 'best'}")


@app.command()
def evaluate(
    annotations: Annotations,
    images: ImagesOf,
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "test",
    model: ModelName = "default",
    features: Annotated[
        Path | None, typer.Option(help="Feature store of the images (else extracted on the fly).")
    ] = None,
    rerank: Annotated[
        int, typer.Option(help="Re-rank each query's top K with cross-attention (0: off).")
    ] = 0,
    reranker: RerankerName = "default",
    json_out: JsonOut = None,
    prior: Annotated[
        bool, typer.Option(help="Rank with the model's query-bank prior, when it has one.")
    ] = True,
) -> None:
    """Recall@1/5/10 both ways and AR of a model on one split."""
    from lightningdot.evaluation.evaluate import evaluate_split
    from lightningdot.io import write_json

    with user_errors(), progress_bar() as bar:
        progress = Bar(bar)
        metrics = evaluate_split(
            annotations,
            images,
            split,
            model,
            features,
            rerank,
            reranker,
            prior,
            progress,
            progress.say,
        )
    print_metrics(metrics)
    if json_out is not None:
        write_json(json_out, metrics)


@app.command()
def bench(
    annotations: Annotations,
    images: ImagesOf,
    split: Annotated[str, typer.Option(help="Split whose images are the gallery.")] = "test",
    model: ModelName = "default",
    reranker: Annotated[str, typer.Option(help="Shipped re-ranker name or folder.")] = "default",
    features: Annotated[
        Path | None, typer.Option(help="Feature store of the images (else extracted first).")
    ] = None,
    rerank: Annotated[int, typer.Option(help="Top K the re-ranker re-scores.")] = 16,
    queries: Annotated[int, typer.Option(help="Text queries timed per method.")] = 50,
    full_queries: Annotated[
        int, typer.Option(help="Queries timed for the (slow) full cross-attention ranking.")
    ] = 3,
    recall: Annotated[bool, typer.Option(help="Also measure the recalls of both methods.")] = True,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
) -> None:
    """Time LightningDOT (dot product, + re-rank) against cross-attention over the whole gallery."""
    import torch

    from lightningdot.evaluation.bench import bench_split
    from lightningdot.io import write_json

    with user_errors(), console.status("timing"):
        report = bench_split(
            annotations,
            images,
            split,
            model,
            reranker,
            features,
            rerank,
            queries,
            full_queries,
            recall,
        )
    print_bench(report, torch.get_num_threads())
    if json_out is not None:
        write_json(json_out, report.to_json())


@app.command()
def index(
    out: Annotated[Path, typer.Option(help="Index folder to write (or grow with --add).")],
    images: Annotated[Path, typer.Option(help="Folder of the images.")],
    annotations: Annotated[
        Path | None, typer.Option(help="Karpathy-format file naming the images and captions.")
    ] = None,
    split: Annotated[str | None, typer.Option(help="Only this split of the annotations.")] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help='Shipped model name or model folder (default: "default"; with --add, the one '
            "that built the index)."
        ),
    ] = None,
    factory: Annotated[str, typer.Option(help='FAISS factory string, e.g. "HNSW32".')] = "Flat",
    features: Annotated[
        Path | None, typer.Option(help="Feature store of the images (else extracted here).")
    ] = None,
    add: Annotated[
        bool, typer.Option("--add", help="Add new images to an existing index.")
    ] = False,
) -> None:
    """Encode a collection into a FAISS index (images, and captions when known)."""
    from lightningdot.index.folder import add_images, index_images

    with user_errors(), progress_bar() as bar:
        if add:
            added, total = add_images(out, images, annotations, split, model, features, Bar(bar))
        else:
            built = index_images(
                out, images, annotations, split, model, factory, features, Bar(bar)
            )
    if add:
        console.print(f"added {added} new image(s); {total} in {out}")
        return
    console.print(
        ", ".join(f"{len(ix)} {name}" for name, ix in built.indexes.items()) + f" -> {out}"
    )
    if built.recall_at_10 is not None:
        console.print(
            f"{factory}: recall@10 against exact search = {built.recall_at_10:.3f} "
            f"({built.recall_queries} sample queries)"
        )


@app.command()
def search(
    index_dir: Annotated[Path, typer.Argument(help="Index folder from `ldot index`.")],
    queries: Annotated[list[str] | None, typer.Argument(help="Text queries (text->image).")] = None,
    image: Annotated[
        list[Path] | None, typer.Option(help="Image query file(s) (image->text); repeatable.")
    ] = None,
    images: Annotated[
        bool, typer.Option("--similar", help="With --image: similar images instead of captions.")
    ] = False,
    k: Annotated[int, typer.Option(help="Results per query.")] = 10,
    model: IndexModel = None,
    rerank: Annotated[
        int, typer.Option(help="Re-rank the top K with cross-attention (0: off).")
    ] = 0,
    reranker: RerankerName = "default",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Search an index with text queries, or with image files."""
    from lightningdot.retrieval import Retriever

    with user_errors():
        if not queries and not image:
            raise LightningDotError("give a text query or --image FILE")
        retriever = Retriever.open(index_dir, model, reranker=reranker if rerank else None)
        if image:
            labels = [str(p) for p in image]
            target = "images" if images else "captions"
            answers = retriever.search_image(list(image), k, target, rerank)
        else:
            labels = list(queries or [])
            answers = retriever.search_text(labels, k, rerank)
    print_answers(labels, answers, json_out)


@app.command()
def export(
    model: Annotated[
        str, typer.Argument(help="Model or re-ranker folder to export (e.g. runs/NAME/best).")
    ],
    out: Annotated[
        Path, typer.Option(help="Folder to write, e.g. src/lightningdot/weights/default.")
    ],
    dtype: Annotated[str, typer.Option(help="float16, bfloat16 or float32.")] = "float16",
    force: Annotated[
        bool, typer.Option(help="Replace a model with a better recorded val AR.")
    ] = False,
) -> None:
    """Write a compact copy of a model or re-ranker (trained parameters only, in a small dtype).

    Refuses to replace one whose recorded validation AR is higher, unless --force.
    """
    from lightningdot.model.export import export as run_export

    with user_errors():
        weights = run_export(model, out, dtype, force)
    console.print(f"wrote {out} ({weights.stat().st_size / 2**20:.1f} MiB of weights, {dtype})")


@app.command()
def serve(
    index_dir: Annotated[Path, typer.Argument(help="Index folder from `ldot index`.")],
    host: Annotated[str, typer.Option(help="Address to bind (0.0.0.0 for every interface).")] = (
        "127.0.0.1"
    ),
    port: int = 8000,
    model: IndexModel = None,
    reranker: Annotated[
        str,
        typer.Option(
            help='Re-ranker name or folder; "auto": the shipped one when it fits the model, '
            '"none": no re-ranking.'
        ),
    ] = "auto",
    max_upload_mb: Annotated[float, typer.Option(help="Largest upload per request.")] = 10.0,
    max_batch: Annotated[int, typer.Option(help="Text queries encoded together at most.")] = 32,
    threads: Annotated[
        int, typer.Option(min=0, help="Threads for the model's arithmetic (0: torch's default).")
    ] = 0,
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = True,
) -> None:
    """Serve an index over HTTP: a JSON API and a search page at http://HOST:PORT/."""
    try:
        import uvicorn

        from lightningdot.serve import create_app
    except ImportError as e:
        console.print(f"[bold red]error:[/] {e.name} is missing: pip install 'lightningdot[serve]'")
        raise typer.Exit(2) from None
    import torch

    from lightningdot.config import ServeConfig
    from lightningdot.retrieval import Retriever

    if threads:
        torch.set_num_threads(threads)
    with user_errors():
        cfg = ServeConfig(max_upload_mb=max_upload_mb, max_batch=max_batch)
        retriever = Retriever.open(index_dir, model, reranker=reranker)
    if reranker == "auto" and retriever.reranker is None:
        console.print("the shipped re-ranker does not fit this model: serving without one")
    console.print(
        f"serving {len(retriever.image_index)} images from {index_dir} on http://{host}:{port}/"
        + ("" if retriever.reranker else " (no re-ranker)")
    )
    level = "info" if access_log else "warning"  # uvicorn logs requests at info
    uvicorn.run(
        create_app(retriever, cfg), host=host, port=port, access_log=access_log, log_level=level
    )


@app.command()
def demo(
    model: ModelName = "default",
    k: Annotated[int, typer.Option(help="Results per query.")] = 3,
) -> None:
    """Index sample photos (from scikit-image) and show ranked results for a few queries."""
    from lightningdot.demo import run_demo

    with user_errors(), console.status("encoding the gallery"):
        results, info = run_demo(model, k)
    print_demo(results, info)


@app.callback()
def _root() -> None:
    """LightningDOT: real-time image-text retrieval."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""`ldot`: one command line, one subcommand per stage. Each command parses its arguments, calls
one library function and prints what it returns (`lightningdot.console`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

import lightningdot.console as show
from lightningdot.errors import LightningDotError

app = typer.Typer(
    help="LightningDOT: real-time image-text retrieval.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def opt(help: str, *names: str) -> Any:
    """A command-line option with its help, as typer reads it from an `Annotated` hint."""
    return typer.Option(*names, help=help)


Recipe = Annotated[Path, typer.Argument(help="Training recipe (.toml).")]
RunFolder = Annotated[Path, opt("Run folder (checkpoints, log); resumed if present.")]
Annotations = Annotated[Path, opt("Karpathy-format annotation file.")]
MaybeAnnotations = Annotated[
    Path | None, opt("Karpathy-format file naming the images (and captions).")
]
Split = Annotated[str | None, opt("Only this split of the annotations.")]
ImageDir = Annotated[Path, opt("Folder of the images.")]
ImagesOf = Annotated[Path, opt("Folder of the images it names.")]
Features = Annotated[Path | None, opt("Feature store of the images (else their files are read).")]
ModelName = Annotated[str, opt("Shipped model name or model folder.")]
IndexModel = Annotated[str | None, opt("Model (default: the one that built the index).")]
Rerank = Annotated[int, opt("Re-rank each query's top K with cross-attention (0: off).")]
RerankerName = Annotated[str, opt("Shipped re-ranker name or folder (with --rerank).")]
JsonOut = Annotated[Path | None, opt("Write the results here.", "--json")]
IndexDir = Annotated[Path, typer.Argument(help="Index folder from `ldot index`.")]
Sync = Annotated[
    bool,
    opt(
        "Bring an existing index in line with the folder, one of its roots: add new images, "
        "encode changed ones, remove deleted ones, keep moved ones without encoding them.",
        "--sync",
    ),
]
Watch = Annotated[
    Path | None,
    opt(
        "Keep the index in line with this folder of its images while serving: a sync now, "
        "then after each burst of changes there (needs the watchdog package)."
    ),
]
Runtime = Annotated[
    str,
    opt(
        'What runs the encoders: onnx, onnx-int8 or eager (PyTorch); "auto": $LDOT_RUNTIME, '
        "else onnx."
    ),
]


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn errors caused by input into one red line and exit code 2, without a traceback."""
    try:
        yield
    except LightningDotError as e:
        show.print_error(e)
        raise typer.Exit(2) from None


@app.command()
def extract(
    images: ImageDir,
    out: Annotated[Path, opt("Feature store folder to write (or resume).")],
    annotations: MaybeAnnotations = None,
    split: Split = None,
    backbone: Annotated[str, opt("Registered backbone.")] = "efficientnet-lite2",
    detector: Annotated[bool, opt("Import precomputed detector regions (.npz per image).")] = False,
    batch_size: int = 32,
    shard_size: int = 256,
    runtime: Runtime = "auto",
) -> None:
    """Extract region features of a collection into a feature store (resumable)."""
    from lightningdot.config import RuntimeConfig
    from lightningdot.features.extract import extract_collection

    with user_errors(), show.progress_bar() as bar:
        args = (images, out, annotations, split, backbone, detector, batch_size, shard_size)
        summary = extract_collection(*args, show.Bar(bar), RuntimeConfig(runtime))
    show.print_extracted(summary, out)


def _fit(cls: type, recipe: Path, out: Path, label: str, run, **kw: Any) -> dict:
    """Read a recipe of type `cls` and run a trainer on it with a progress bar."""
    from lightningdot.config import load_config

    with user_errors():
        cfg = load_config(cls, recipe)
        with show.progress_bar() as bar:
            on_step = show.step_reporter(bar, label, cfg.loop.epochs)
            return run(cfg, out, on_step, log=bar.console.print, **kw)


@app.command()
def pretrain(recipe: Recipe, out: RunFolder) -> None:
    """Pre-train with VMLM + SMRM + CMR, mixed as the recipe says."""
    from lightningdot.config import TrainConfig
    from lightningdot.training.pretrain import train

    show.print_best(_fit(TrainConfig, recipe, out, "pretrain", train), out)


@app.command()
def finetune(recipe: Recipe, out: RunFolder) -> None:
    """Fine-tune with CMR (from `init_from` in the recipe, or from the pretrained encoders)."""
    from lightningdot.config import TrainConfig
    from lightningdot.training.pretrain import finetune as run

    show.print_best(_fit(TrainConfig, recipe, out, "finetune", run), out)


@app.command()
def bank(
    model: Annotated[
        Path, typer.Argument(help="Model folder to give a bank (e.g. runs/NAME/best).")
    ],
    annotations: Annotated[Path, opt("Karpathy-format file the model trained on.")],
    features: Annotated[Path, opt("Feature store of its images.")],
    split: Annotated[str, opt("Split to draw the bank from (not one you evaluate on).")] = "train",
    size: Annotated[int, opt("Captions, and images, in the bank.")] = 2000,
    beta: Annotated[float, opt("Inverse temperature of the inverted softmax.")] = 10.0,
    seed: Annotated[int, opt("Seed of the draw.")] = 0,
) -> None:
    """Give a model a query bank: indexes it builds then rank by dot product plus a per-item prior
    that discounts hubs (an inverted softmax over the bank; see `lightningdot.model.prior`)."""
    from lightningdot.config import BankConfig, from_dict
    from lightningdot.training.bank import give_bank

    with user_errors():
        cfg = from_dict(BankConfig, {"split": split, "size": size, "beta": beta, "seed": seed})
        made = give_bank(model, annotations, features, cfg)
    show.print_bank(made, model)


@app.command()
def concepts(
    model: Annotated[
        Path, typer.Argument(help="Model folder to give a concept view (e.g. runs/NAME/best).")
    ],
    annotations: Annotated[Path, opt("Karpathy-format file the model trained on.")],
    features: Annotated[Path, opt("Feature store of its images.")],
    split: Annotated[str, opt("Split whose images set the view's mean and spread.")] = "train",
    temperature: Annotated[float | None, opt("Softmax temperature over the classes.")] = None,
    text_weight: Annotated[float | None, opt("Most weight a text query gives concepts.")] = None,
    gate_slope: Annotated[float | None, opt("Slope of the text query's gate.")] = None,
    gate_shift: Annotated[float | None, opt("Name cosine where the gate is half open.")] = None,
    image_weight: Annotated[float | None, opt("An image query's weight on concepts.")] = None,
) -> None:
    """Give a model the concept view of its backbone's 1,000 ImageNet classes: every vector gets
    their coordinates, so an index knows objects its captions never named (indexes built
    before keep working on the main vectors). Weights left
    out take the fitted defaults (README, "Concepts beyond the captions")."""
    from lightningdot.config import ConceptConfig, from_dict
    from lightningdot.training.concepts import give_concepts

    given = {
        "temperature": temperature,
        "text_weight": text_weight,
        "gate_slope": gate_slope,
        "gate_shift": gate_shift,
        "image_weight": image_weight,
    }
    with user_errors():
        settings = {"split": split, **{k: v for k, v in given.items() if v is not None}}
        view = give_concepts(model, annotations, features, from_dict(ConceptConfig, settings))
    show.console.print(f"wrote {model / 'concepts.safetensors'}: {len(view.names)} classes")


@app.command()
def align(
    recipe: Annotated[Path, typer.Argument(help="TOML recipe (see recipes/multilingual.toml).")],
    out: Annotated[Path, opt("Run folder: best/, last/, log.jsonl.")],
) -> None:
    """Train a text encoder (e.g. multilingual) into an existing model's embedding space,
    keeping its image encoder, so the indexes that model built serve the new one."""
    from lightningdot.config import AlignConfig
    from lightningdot.training.align import align as run

    show.print_best(_fit(AlignConfig, recipe, out, "align", run), out)


@app.command("train-reranker")
def train_reranker(
    recipe: Annotated[Path, typer.Argument(help="Re-ranker recipe (.toml).")],
    out: Annotated[Path, opt("Run folder (checkpoints, log).")],
    val_k: Annotated[int, opt("Top K re-ranked in validation.")] = 16,
) -> None:
    """Train the cross-attention re-ranker on hard negatives mined by the bi-encoder."""
    from lightningdot.config import RerankTrainConfig
    from lightningdot.training.reranker import train_reranker as run

    best = _fit(RerankTrainConfig, recipe, out, "re-ranker", run, val_k=val_k)
    show.print_best(best, out, f"re-ranking the top {val_k}:")


@app.command()
def evaluate(
    annotations: Annotations,
    images: ImagesOf,
    split: Annotated[str, opt("Split to evaluate.")] = "test",
    model: ModelName = "default",
    features: Features = None,
    rerank: Rerank = 0,
    reranker: RerankerName = "default",
    json_out: JsonOut = None,
    prior: Annotated[bool, opt("Rank with the model's query-bank prior, when it has one.")] = True,
    runtime: Runtime = "auto",
) -> None:
    """Recall@1/5/10 both ways and AR of a model on one split."""
    from lightningdot.config import RuntimeConfig
    from lightningdot.evaluation.evaluate import evaluate_split

    with user_errors(), show.progress_bar() as bar:
        args = (annotations, images, split, model, features, rerank, reranker, prior)
        progress = show.Bar(bar)
        metrics = evaluate_split(*args, progress, progress.say, RuntimeConfig(runtime))
    with user_errors():  # a --json path that cannot be written
        show.print_metrics(metrics, json_out)


@app.command()
def bench(
    annotations: Annotations,
    images: ImagesOf,
    split: Annotated[str, opt("Split whose images are the gallery.")] = "test",
    model: ModelName = "default",
    reranker: Annotated[str, opt("Shipped re-ranker name or folder.")] = "default",
    features: Features = None,
    rerank: Annotated[int, opt("Top K the re-ranker re-scores.")] = 16,
    queries: Annotated[int, opt("Text queries timed per method.")] = 50,
    full_queries: Annotated[
        int, opt("Queries timed for the (slow) full cross-attention ranking.")
    ] = 3,
    recall: Annotated[bool, opt("Also measure the recalls of both methods.")] = True,
    json_out: JsonOut = None,
) -> None:
    """Time LightningDOT (dot product, + re-rank) against cross-attention over the whole gallery."""
    from lightningdot.evaluation.bench import bench_split

    with user_errors(), show.console.status("timing"):
        args = (annotations, images, split, model, reranker, features, rerank, queries)
        report = bench_split(*args, full_queries, recall)
    with user_errors():
        show.print_bench(report, json_out)


@app.command()
def index(
    out: Annotated[Path, opt("Index folder to write (or grow with --add).")],
    images: ImageDir,
    annotations: MaybeAnnotations = None,
    split: Split = None,
    model: Annotated[
        str | None,
        opt('Model name or folder ("default"; with --add, the index\'s own).'),
    ] = None,
    factory: Annotated[str, opt('FAISS factory string, e.g. "HNSW32".')] = "Flat",
    features: Features = None,
    add: Annotated[bool, opt("Add new images to an existing index.", "--add")] = False,
    sync: Sync = False,
    runtime: Runtime = "auto",
    states: Annotated[
        bool | None,
        opt(
            "Keep what re-ranking reads of each image (about 63 KB per image), so that it "
            "needs neither the image files nor a feature store (kept by default); an add keeps "
            "what the index was built with.",
            "--states/--no-states",
        ),
    ] = None,
    metadata: Annotated[
        Path | None,
        opt(
            "Fields of the images for filters: JSON Lines or CSV, a row per image keyed by "
            "its `path` in the folder; bad rows are skipped and named."
        ),
    ] = None,
    backend: Annotated[
        str, opt("Where the vectors go: faiss (in the folder) or milvus (with --uri).")
    ] = "faiss",
    uri: Annotated[
        str | None,
        opt("Milvus: a milvus-lite file (PATH.db) or a server (http://host:19530)."),
    ] = None,
    collection: Annotated[
        str | None, opt("Milvus: base name of the collections (default: from --out).")
    ] = None,
) -> None:
    """Encode a collection into an index folder (images, and captions when known): FAISS
    indexes in it, or Milvus collections it names."""
    if sync:  # what a sync does not take, by whether it was given
        given = {"--add": add, "--states/--no-states": states is not None, "--features": features}
        given |= {"--backend": backend != "faiss", "--uri": uri, "--collection": collection}
        return sync_index(out, images, annotations, split, model, runtime, metadata, given)
    from lightningdot.config import RuntimeConfig
    from lightningdot.index.build import add_images, index_images

    with user_errors(), show.progress_bar() as bar:
        run_on, progress = RuntimeConfig(runtime), show.Bar(bar)
        if add and states is not None:
            raise LightningDotError(
                "--states/--no-states is for a build: an add keeps the index's own"
            )
        milvus = milvus_target(backend, uri, collection, add)
        if add:
            args = (out, images, annotations, split, model, features, progress, run_on)
            report = add_images(*args, fields_file=metadata)
        else:
            args = (out, images, annotations, split, model, factory, features, progress, run_on)
            report = index_images(*args, states is not False, metadata, milvus)
    if add:
        show.console.print(f"added {report.added} new image(s); {report.total} in {out}")
    else:
        show.print_built(report, factory, out)
    show.print_skipped(report.failed)
    show.print_skipped(report.skipped_fields, "metadata row(s)")


def milvus_target(backend: str, uri: str | None, collection: str | None, add: bool):
    """The Milvus target of `ldot index`'s options (None for FAISS)."""
    from lightningdot.index.milvus import MilvusTarget

    if backend not in ("faiss", "milvus"):
        raise LightningDotError(f"--backend is faiss or milvus, not {backend!r}")
    if backend == "faiss":
        if uri or collection:
            raise LightningDotError("--uri and --collection go with --backend milvus")
        return None
    if add:
        raise LightningDotError(
            "--add grows an index on the backend it was built on: drop --backend"
        )
    if not uri:
        raise LightningDotError(
            "--backend milvus needs --uri (a PATH.db file or http://host:19530)"
        )
    return MilvusTarget(uri, collection)


def sync_index(out, images, annotations, split, model, runtime, metadata, refused) -> None:
    """`ldot index --sync` (`lightningdot.index.sync`); `refused`: the options it does not
    take, by whether they were given."""
    from lightningdot.config import RuntimeConfig
    from lightningdot.index.sync import sync_images

    with user_errors(), show.progress_bar() as bar:
        if given := [name for name, value in refused.items() if value]:
            raise LightningDotError(
                f"--sync takes no {', '.join(given)}: it reads the image files and keeps "
                "what the index was built with"
            )
        args = (out, images, annotations, split, model, show.Bar(bar), RuntimeConfig(runtime))
        report = sync_images(*args, fields_file=metadata)
    show.print_synced(report, out)
    show.print_skipped(report.failed)
    show.print_skipped(report.skipped_fields, "metadata row(s)")


@app.command()
def search(
    index_dir: IndexDir,
    queries: Annotated[list[str] | None, typer.Argument(help="Text queries (text->image).")] = None,
    image: Annotated[
        list[Path] | None, opt("Image query file(s) (image->text); repeatable.")
    ] = None,
    similar: Annotated[
        bool, opt("With --image: similar images instead of captions.", "--similar")
    ] = False,
    k: Annotated[int, opt("Results per query.")] = 10,
    model: IndexModel = None,
    rerank: Rerank = 0,
    reranker: RerankerName = "default",
    json_out: Annotated[bool, opt("Print JSON instead of tables.", "--json")] = False,
    runtime: Runtime = "auto",
    explain: Annotated[
        Path | None,
        opt(
            "Folder to write why each result matched: a PNG of each image result with a heat "
            "map of its regions; with --image, a JSON of each caption's token weights."
        ),
    ] = None,
    filter: Annotated[
        str | None,
        opt('Only images whose fields pass this JSON filter, e.g. \'{"folder": "trips/"}\'.'),
    ] = None,
    offset: Annotated[int, opt("Skip this many results first (paging).")] = 0,
) -> None:
    """Search an index with text queries, or with image files."""
    from lightningdot.config import RuntimeConfig
    from lightningdot.retrieval import Page, Retriever

    with user_errors():
        if not queries and not image:
            raise LightningDotError("give a text query or --image FILE")
        if explain is not None and image and similar:
            raise LightningDotError("--explain explains text->image and image->text results")
        cross = reranker if rerank > 0 else None
        retriever = Retriever.open(index_dir, model, reranker=cross, runtime=RuntimeConfig(runtime))
        why, page = explain is not None, Page(filter, offset)
        if image:
            labels = [str(p) for p in image]
            target = "images" if similar else "captions"
            answers = retriever.search_image(list(image), k, target, rerank, why, page)
        else:
            labels = list(queries or [])
            answers = retriever.search_text(labels, k, rerank, explain=why, page=page)
        if explain is not None:
            written = write_explanations(retriever, answers, explain)
    show.print_answers(labels, answers, json_out)
    if explain is not None:
        show.console.print(f"wrote {written} explanation file(s) to {explain}", highlight=False)


@app.command()
def delete(
    index_dir: IndexDir,
    image_ids: Annotated[list[str], typer.Argument(help="Ids of the images to delete.")],
) -> None:
    """Delete images, and their captions, from an index: all of them or, if one is not in
    the index, none."""
    from lightningdot.index.engines import load_index

    with user_errors():
        index = load_index(index_dir)
        index.delete(image_ids)
    show.console.print(
        f"deleted {len(image_ids)} image(s); {index.image_index.count} left in {index_dir}",
        highlight=False,
    )


@app.command()
def compact(index_dir: IndexDir) -> None:
    """Drop what deletes left behind in a FAISS index folder, in one commit: a delete only
    marks its rows, which searches then step over and the files keep. Searches go on
    meanwhile. A Milvus collection needs none: its deleted rows are purged after each change."""
    from lightningdot.index.engines import load_index

    with user_errors():
        index = load_index(index_dir)
        dropped = index.compact()
    # Below 0: a Milvus change too large for its record to list what it retired.
    rows = "the deleted rows" if dropped < 0 else f"{dropped} deleted row(s)"
    count = index.image_index.count
    show.console.print(f"dropped {rows}; {count} image(s) in {index_dir}", highlight=False)


def write_explanations(retriever, answers, out: Path) -> int:
    """Each answer's heat maps (image results) or token weights (caption results) into `out`,
    named by query number and rank; returns how many files."""
    from dataclasses import asdict

    from lightningdot.features import load_image
    from lightningdot.heatmap import overlay_png
    from lightningdot.io import atomic_path, write_json

    if out.exists() and not out.is_dir():
        raise LightningDotError(f"--explain {out} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    for q, answer in enumerate(answers, 1):
        tokens = [{"id": r.id, **asdict(r.tokens)} for r in answer.results if r.tokens]
        if tokens:
            write_json(out / f"q{q:02d}-captions.json", tokens)
            count += 1
        for rank, r in enumerate(answer.results, 1):
            if r.regions is not None:
                png = overlay_png(load_image(retriever.file_of(r.id)), r.regions)
                with atomic_path(out / f"q{q:02d}-{rank:02d}-{Path(r.id).stem}.png") as tmp:
                    tmp.write_bytes(png)
                count += 1
    return count


@app.command()
def export(
    model: Annotated[
        str, typer.Argument(help="Model or re-ranker folder to export (e.g. runs/NAME/best).")
    ],
    out: Annotated[Path, opt("Folder to write, e.g. src/lightningdot/weights/default.")],
    dtype: Annotated[str, opt("float16, bfloat16 or float32.")] = "float16",
    force: Annotated[bool, opt("Replace a model with a better recorded val AR.")] = False,
) -> None:
    """Write a compact copy of a model or re-ranker (trained parameters only, in a small dtype).

    Refuses to replace one whose recorded validation AR is higher, unless --force.
    """
    from lightningdot.model.export import export as run_export

    with user_errors():
        weights = run_export(model, out, dtype, force)
    show.console.print(
        f"wrote {out} ({weights.stat().st_size / 2**20:.1f} MiB of weights, {dtype})"
    )


@app.command()
def serve(
    index_dir: IndexDir,
    host: Annotated[str, opt("Address to bind (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    model: IndexModel = None,
    reranker: Annotated[
        str,
        typer.Option(
            help='Re-ranker name or folder; "auto": the shipped one when it fits the model, '
            '"none": no re-ranking.'
        ),
    ] = "auto",
    max_upload_mb: Annotated[
        float, typer.Option(min=0.001, help="Largest upload per request.")
    ] = 10.0,
    max_batch: Annotated[
        int, typer.Option(min=1, help="Text queries encoded together at most.")
    ] = 32,
    threads: Annotated[
        int, typer.Option(min=0, help="Threads for the model's arithmetic (0: torch's default).")
    ] = 0,
    access_log: Annotated[bool, opt("Log every request.")] = True,
    runtime: Runtime = "auto",
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="LDOT_API_KEY",
            show_default=False,
            help="Key that the routes changing the index (POST /images) require, as "
            "'Authorization: Bearer KEY' or 'X-API-Key: KEY'; without one they are off on any "
            "--host but loopback. LDOT_API_KEY keeps it out of the process list.",
        ),
    ] = None,
    watch: Watch = None,
) -> None:
    """Serve an index over HTTP: a JSON API and a search page at http://HOST:PORT/."""
    try:
        from lightningdot.serve.server import serve_index
    except ImportError as e:
        show.console.print(
            f"[bold red]error:[/] {e.name} is missing: pip install 'lightningdot[serve]'"
        )
        raise typer.Exit(2) from None
    from lightningdot.config import ServeConfig

    with user_errors():
        cfg = ServeConfig(max_upload_mb=max_upload_mb, max_batch=max_batch)
        serve_index(
            index_dir,
            host,
            port,
            model,
            reranker,
            cfg,
            threads,
            access_log,
            show.console.print,
            api_key=api_key,
            runtime=runtime,
            watch=watch,
        )


@app.command()
def demo(
    model: ModelName = "default",
    k: Annotated[int, opt("Results per query.")] = 3,
) -> None:
    """Index sample photos (from scikit-image) and show ranked results for a few queries."""
    from lightningdot.demo import run_demo

    with user_errors(), show.console.status("encoding the gallery"):
        results, info = run_demo(model, k)
    show.print_demo(results, info)


if __name__ == "__main__":
    app()

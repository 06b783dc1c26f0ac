"""`ldot`: one command line, one subcommand per stage."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from lightningdot.errors import LightningDotError

app = typer.Typer(
    help="LightningDOT: real-time image-text retrieval.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn errors caused by input into one red line and exit code 2, without a traceback."""
    try:
        yield
    except LightningDotError as e:
        console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2) from None


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def step_reporter(bar: Progress, label: str, epochs: int):
    """A training loop's `on_step` callback that moves a progress bar and shows the loss."""
    task = bar.add_task(label, total=None)

    def on_step(epoch: int, step: int, steps: int, losses: dict[str, float]) -> None:
        bar.update(
            task,
            total=steps,
            completed=step + 1,
            description=f"{label} epoch {epoch + 1}/{epochs} loss {losses['loss']:.3f}",
        )

    return on_step


def _corpus(annotations: Path | None, images: Path, split: str | None):
    from lightningdot.data import read_image_folder, read_karpathy

    if annotations is not None:
        return read_karpathy(annotations, split)
    return read_image_folder(images)


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
    from lightningdot.features import create_backbone
    from lightningdot.features.extract import extract_images, import_detector_features

    with user_errors():
        if detector:
            files = sorted(images.rglob("*.npz")) if images.is_dir() else []
            if not files:
                raise LightningDotError(f"no .npz detector files under {images}")
            items = [(p.relative_to(images).with_suffix("").as_posix(), p) for p in files]
        else:
            corpus = _corpus(annotations, images, split)
            items = [(k, images / k) for k in corpus.keys()]
        with progress_bar() as bar:
            task = bar.add_task("extracting", total=len(items))

            def advance(n: int) -> None:
                bar.advance(task, n)

            if detector:
                summary = import_detector_features(items, out, shard_size, advance)
            else:
                net = create_backbone(backbone)
                summary = extract_images(items, out, net, batch_size, shard_size, advance)
        console.print(
            f"{summary.extracted} extracted, {summary.skipped} already done, "
            f"{len(summary.failed)} failed, of {summary.total} "
            f"({summary.images_per_second:.1f} images/s) -> {out}"
        )
        for key, reason in summary.failed:
            console.print(f"  [yellow]skipped[/] {key}: {reason}")


def _train(recipe: Path, out: Path, mode: str) -> None:
    from lightningdot.config import TrainConfig, load_config
    from lightningdot.train import train

    with user_errors():
        cfg = load_config(TrainConfig, recipe)
        w = cfg.objectives
        if mode == "finetune" and (w.vmlm or w.smrm):
            raise LightningDotError(f"{recipe}: fine-tuning uses CMR alone; set vmlm = smrm = 0")
        with progress_bar() as bar:
            best = train(cfg, out, step_reporter(bar, mode, cfg.epochs), log=bar.console.print)
        if best:
            console.print(f"best val AR {best['ar']:.2f} -> {out / 'best'}")


@app.command()
def pretrain(
    recipe: Annotated[Path, typer.Argument(help="Training recipe (.toml).")],
    out: Annotated[Path, typer.Option(help="Run folder (checkpoints, log); resumed if present.")],
) -> None:
    """Pre-train with VMLM + SMRM + CMR, mixed as the recipe says."""
    _train(recipe, out, "pretrain")


@app.command()
def finetune(
    recipe: Annotated[Path, typer.Argument(help="Training recipe (.toml).")],
    out: Annotated[Path, typer.Option(help="Run folder (checkpoints, log); resumed if present.")],
) -> None:
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
    that discounts hubs (an inverted softmax over the bank; see `lightningdot.prior`)."""
    import torch

    from lightningdot.checkpoint import load_model, read_model_config, save_bank
    from lightningdot.io import write_json
    from lightningdot.prior import make_bank

    with user_errors():
        if not (model / "config.json").is_file():
            raise LightningDotError(f"not a model folder (no config.json): {model}")
        if size < 1 or beta <= 0:
            raise LightningDotError("--size must be at least 1 and --beta positive")
        net = load_model(model)
        if net.cfg.image_from:
            raise LightningDotError(
                f"{model} uses the image side and query bank of {net.cfg.image_from!r}; "
                "give that model a bank instead"
            )
        made = make_bank(net, annotations, features, split, size, beta, seed)
        _, meta = read_model_config(model)
        meta["bank"] = save_bank(model, made, torch.float32)
        write_json(model / "config.json", meta)
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
    from lightningdot.align import align as run_align
    from lightningdot.config import AlignConfig, load_config

    with user_errors():
        cfg = load_config(AlignConfig, recipe)
        with progress_bar() as bar:
            best = run_align(cfg, out, step_reporter(bar, "align", cfg.epochs), bar.console.print)
        if best:
            per = ", ".join(f"{k} {m['ar']:.2f}" for k, m in best["languages"].items())
            console.print(f"best mean val AR {best['ar']:.2f} ({per}) -> {out / 'best'}")


@app.command("train-reranker")
def train_reranker_cmd(
    recipe: Annotated[Path, typer.Argument(help="Re-ranker recipe (.toml).")],
    out: Annotated[Path, typer.Option(help="Run folder (checkpoints, log).")],
    val_k: Annotated[int, typer.Option(help="Top K re-ranked in validation.")] = 16,
) -> None:
    """Train the cross-attention re-ranker on hard negatives mined by the bi-encoder."""
    from lightningdot.config import RerankTrainConfig, load_config
    from lightningdot.train_reranker import train_reranker

    with user_errors():
        cfg = load_config(RerankTrainConfig, recipe)
        with progress_bar() as bar:
            on_step = step_reporter(bar, "re-ranker", cfg.epochs)
            best = train_reranker(cfg, out, on_step, log=bar.console.print, val_k=val_k)
        if best:
            console.print(
                f"best val AR re-ranking the top {val_k}: {best['ar']:.2f} -> {out / 'best'}"
            )


@app.command()
def evaluate(
    annotations: Annotated[Path, typer.Option(help="Karpathy-format annotation file.")],
    images: Annotated[Path, typer.Option(help="Folder of the images it names.")],
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "test",
    model: Annotated[str, typer.Option(help="Shipped model name or model folder.")] = "default",
    features: Annotated[
        Path | None, typer.Option(help="Feature store of the images (else extracted on the fly).")
    ] = None,
    rerank: Annotated[
        int, typer.Option(help="Re-rank each query's top K with cross-attention (0: off).")
    ] = 0,
    reranker: Annotated[
        str, typer.Option(help="Shipped re-ranker name or folder (with --rerank).")
    ] = "default",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the metrics here.")] = None,
    prior: Annotated[
        bool, typer.Option(help="Rank with the model's query-bank prior, when it has one.")
    ] = True,
) -> None:
    """Recall@1/5/10 both ways and AR of a model on one split."""
    from lightningdot.checkpoint import load_model
    from lightningdot.data import read_karpathy
    from lightningdot.evaluate import RetrievalEvaluator, file_batches, store_batches
    from lightningdot.features import FeatureStore, concat_batches, create_backbone
    from lightningdot.io import write_json
    from lightningdot.rerank import evaluate_reranked, load_reranker

    with user_errors():
        if rerank < 0:
            raise LightningDotError("--rerank must be >= 0")
        corpus = read_karpathy(annotations, split)
        if not images.is_dir():
            raise LightningDotError(f"image folder not found: {images}")
        net = load_model(model)
        if not prior:
            net.bank = None
        cross = load_reranker(reranker, bi=net) if rerank else None
        keys = corpus.keys()
        with progress_bar() as bar:
            task = bar.add_task("encoding images", total=len(keys))
            if features is not None:
                store = FeatureStore(features)

                def regions():
                    for b in store_batches(store, keys):
                        yield b
                        bar.advance(task, len(b))
            else:
                backbone = create_backbone(net.cfg.backbone)

                def regions():
                    paths = [images / k for k in keys]
                    yield from file_batches(
                        backbone, paths, on_progress=lambda n: bar.advance(task, n)
                    )

            if cross is None:
                metrics = RetrievalEvaluator(corpus, regions)(net)
            else:
                gallery = concat_batches(list(regions()))
                bar.update(task, description=f"re-ranking the top {rerank}")
                metrics = evaluate_reranked(
                    cross, corpus.captions, corpus.caption_image, gallery, rerank
                )
        print_metrics(metrics)
        if json_out is not None:
            write_json(json_out, metrics)


@app.command()
def bench(
    annotations: Annotated[Path, typer.Option(help="Karpathy-format annotation file.")],
    images: Annotated[Path, typer.Option(help="Folder of the images it names.")],
    split: Annotated[str, typer.Option(help="Split whose images are the gallery.")] = "test",
    model: Annotated[str, typer.Option(help="Shipped model name or model folder.")] = "default",
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
    from rich.table import Table

    from lightningdot.bench import run_bench
    from lightningdot.checkpoint import load_model
    from lightningdot.data import read_karpathy
    from lightningdot.evaluate import file_batches, store_batches
    from lightningdot.features import FeatureStore, concat_batches, create_backbone
    from lightningdot.io import write_json
    from lightningdot.rerank import load_reranker

    with user_errors():
        if rerank < 1 or queries < 1 or full_queries < 1:
            raise LightningDotError("--rerank, --queries and --full-queries must be >= 1")
        corpus = read_karpathy(annotations, split)
        net = load_model(model)
        cross = load_reranker(reranker, bi=net)
        keys = corpus.keys()
        with console.status("reading the gallery's regions"):
            if features is not None:
                batches = list(store_batches(FeatureStore(features), keys))
            else:
                backbone = create_backbone(net.cfg.backbone)
                batches = list(file_batches(backbone, [images / k for k in keys]))
        with console.status("timing"):
            report = run_bench(
                cross, corpus, concat_batches(batches), rerank, queries, full_queries, recall
            )
        table = Table(title=f"{report.gallery} images, {torch_threads()} threads")
        for col in ("method", "ms / query (median)", "speed-up vs cross_full", "AR"):
            table.add_column(col, justify="right")
        for name in ("dot", "dot_rerank", "cross_full"):
            ar = report.recall.get(name, {}).get("ar")
            table.add_row(
                name,
                f"{report.ms_per_query[name]:.2f}",
                f"{report.speedup.get(name, 1.0):.0f}x",
                "" if ar is None else f"{ar:.2f}",
            )
        Console().print(table)
        if json_out is not None:
            write_json(json_out, report.to_json())


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def print_metrics(m: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{m['n_images']} images, {m['n_captions']} captions")
    for col in ("direction", "R@1", "R@5", "R@10"):
        table.add_column(col, justify="right")
    for d, name in (("t2i", "text->image"), ("i2t", "image->text")):
        table.add_row(name, *(f"{m[d][k]:.2f}" for k in ("r1", "r5", "r10")))
    table.add_row("AR", f"{m['ar']:.2f}", "", "")
    Console().print(table)


@app.command()
def index(
    out: Annotated[Path, typer.Option(help="Index folder to write (or grow with --add).")],
    images: Annotated[Path, typer.Option(help="Folder of the images.")],
    annotations: Annotated[
        Path | None, typer.Option(help="Karpathy-format file naming the images and captions.")
    ] = None,
    split: Annotated[str | None, typer.Option(help="Only this split of the annotations.")] = None,
    model: Annotated[str, typer.Option(help="Shipped model name or model folder.")] = "default",
    factory: Annotated[str, typer.Option(help='FAISS factory string, e.g. "HNSW32".')] = "Flat",
    features: Annotated[
        Path | None, typer.Option(help="Feature store of the images (else extracted here).")
    ] = None,
    add: Annotated[
        bool, typer.Option("--add", help="Add new images to an existing index.")
    ] = False,
) -> None:
    """Encode a collection into a FAISS index (images, and captions when known)."""
    from lightningdot.checkpoint import load_model
    from lightningdot.features import FeatureStore
    from lightningdot.index import IndexConfig
    from lightningdot.retrieval import Retriever, add_to_index, build_index

    with user_errors():
        corpus = _corpus(annotations, images, split)
        store = FeatureStore(features) if features is not None else None
        with progress_bar() as bar:
            task = bar.add_task("encoding images", total=len(corpus.images))

            def advance(n: int) -> None:
                bar.advance(task, n)

            if add:
                retriever = Retriever.open(out, None if model == "default" else model, mmap=False)
                n = add_to_index(retriever, corpus, images, store, advance)
                console.print(f"added {n} new image(s); {len(retriever.images)} in {out}")
                return
            net = load_model(model)
            built = build_index(
                net, model, corpus, images, out, IndexConfig(factory=factory), store, advance
            )
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
    model: Annotated[
        str | None, typer.Option(help="Model (default: the one that built the index).")
    ] = None,
    rerank: Annotated[
        int, typer.Option(help="Re-rank the top K with cross-attention (0: off).")
    ] = 0,
    reranker: Annotated[
        str, typer.Option(help="Shipped re-ranker name or folder (with --rerank).")
    ] = "default",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Search an index with text queries, or with image files."""
    import dataclasses
    import json

    from rich.markup import escape
    from rich.table import Table

    from lightningdot.retrieval import Retriever

    with user_errors():
        if not queries and not image:
            raise LightningDotError("give a text query or --image FILE")
        if k < 1:
            raise LightningDotError("--k must be at least 1")
        if rerank < 0:
            raise LightningDotError("--rerank must be >= 0")
        retriever = Retriever.open(index_dir, model, reranker=reranker if rerank else None)
        if image:
            labels = [str(p) for p in image]
            target = "images" if images else "captions"
            answers = retriever.search_image(list(image), k, target, rerank)
        else:
            labels = list(queries or [])
            answers = retriever.search_text(labels, k, rerank)
        if json_out:
            payload = [
                {
                    "query": q,
                    "results": [dataclasses.asdict(r) for r in a.results],
                    "timing_ms": a.timing_ms,
                }
                for q, a in zip(labels, answers, strict=True)
            ]
            print(
                json.dumps(
                    payload if len(payload) > 1 else payload[0], ensure_ascii=False, indent=1
                )
            )
            return
        out = Console()
        for q, a in zip(labels, answers, strict=True):
            stages = ", ".join(
                f"{name} {ms:.1f} ms" for name, ms in a.timing_ms.items() if name != "total"
            )
            table = Table(title=escape(f"{q!r}  ({stages})"), title_justify="left")
            for col in ("rank", "score", "image", "caption"):
                table.add_column(col)
            for rank, r in enumerate(a.results, 1):
                table.add_row(
                    str(rank), f"{r.score:.3f}", escape(r.path or ""), escape(r.caption or "")
                )
            out.print(table)


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
    import json

    import torch

    from lightningdot.checkpoint import load_model, resolve_model, save_model
    from lightningdot.rerank import load_reranker, save_reranker

    def recorded(folder: Path) -> dict:
        path = folder / "config.json"
        if not path.is_file():
            raise LightningDotError(f"not a model or re-ranker folder (no config.json): {folder}")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise LightningDotError(f"damaged {path}: {e}") from e

    with user_errors():
        dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
        if dtype not in dtypes:
            raise LightningDotError(f"--dtype must be one of {sorted(dtypes)}")
        meta = recorded(resolve_model(model))
        new_ar = meta.get("val", {}).get("ar")
        if (out / "config.json").is_file() and not force:
            old_ar = recorded(out).get("val", {}).get("ar")
            if old_ar is not None and (new_ar is None or new_ar < old_ar):
                raise LightningDotError(
                    f"{out} holds a model with val AR {old_ar:.2f}, this one has "
                    f"{'none recorded' if new_ar is None else f'{new_ar:.2f}'}; use --force to replace it"
                )
        extra = {
            k: meta[k] for k in ("val", "val_rerank_k", "epoch", "train", "align") if k in meta
        }
        if "reranker" in meta:
            rr = load_reranker(model)
            save_reranker(out, rr, meta["bi_encoder"], dtypes[dtype], extra)
        else:
            save_model(out, load_model(model), dtypes[dtype], extra)
        size = (out / "model.safetensors").stat().st_size / 2**20
        console.print(f"wrote {out} ({size:.1f} MiB of weights, {dtype})")


@app.command()
def serve(
    index_dir: Annotated[Path, typer.Argument(help="Index folder from `ldot index`.")],
    host: Annotated[str, typer.Option(help="Address to bind (0.0.0.0 for every interface).")] = (
        "127.0.0.1"
    ),
    port: int = 8000,
    model: Annotated[
        str | None, typer.Option(help="Model (default: the one that built the index).")
    ] = None,
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
    from lightningdot.config import ServeConfig
    from lightningdot.errors import ConfigMismatchError
    from lightningdot.retrieval import Retriever

    with user_errors():
        if threads:
            import torch

            torch.set_num_threads(threads)
        cfg = ServeConfig(max_upload_mb=max_upload_mb, max_batch=max_batch)
        if reranker == "auto":
            try:
                retriever = Retriever.open(index_dir, model, reranker="default")
            except ConfigMismatchError:
                console.print("the shipped re-ranker does not fit this model: serving without one")
                retriever = Retriever.open(index_dir, model)
        else:
            retriever = Retriever.open(
                index_dir, model, reranker=None if reranker == "none" else reranker
            )
        app_ = create_app(retriever, cfg)
    console.print(
        f"serving {len(retriever.images)} images from {index_dir} on http://{host}:{port}/"
        + ("" if retriever.reranker else " (no re-ranker)")
    )
    level = "info" if access_log else "warning"  # uvicorn logs requests at info
    uvicorn.run(app_, host=host, port=port, access_log=access_log, log_level=level)


@app.command()
def demo(
    model: Annotated[str, typer.Option(help="Shipped model name or model folder.")] = "default",
    k: Annotated[int, typer.Option(help="Results per query.")] = 3,
) -> None:
    """Index sample photos (from scikit-image) and show ranked results for a few queries."""
    from rich.markup import escape
    from rich.table import Table

    from lightningdot.demo import run_demo

    with user_errors():
        with console.status("encoding the gallery"):
            results, info = run_demo(model, k)
        out = Console()
        out.print(f"indexed {info['images']} photos in {info['index_s']:.2f} s")
        for r in results:
            title = f"{r.query!r}  (encode {r.encode_ms:.1f} ms, search {r.search_ms:.2f} ms)"
            table = Table(title=escape(title), title_justify="left")
            table.add_column("rank", justify="right")
            table.add_column("result")
            table.add_column("score", justify="right")
            for rank, hit in enumerate(r.hits, 1):
                table.add_row(str(rank), hit.name, f"{hit.score:.3f}")
            out.print(table)


@app.callback()
def _root() -> None:
    """LightningDOT: real-time image-text retrieval."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""What the command line shows: progress bars and tables (rich, on the terminal)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from lightningdot.errors import DataError
from lightningdot.io import write_json

# Messages and bars; results go to standard output. soft_wrap: a message stays one line
# (whatever the terminal's width) so that logs and scripts can read it.
console = Console(stderr=True, soft_wrap=True)


def print_error(error: Exception) -> None:
    """An input error as one red line. Its text is escaped: a file name like `a[/b].jpg`
    would otherwise be read as markup (and a stray closing tag raises)."""
    console.print(f"[bold red]error:[/] {escape(str(error))}")


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    )


class Bar:
    """`lightningdot.progress.Progress` drawn as a rich progress bar."""

    def __init__(self, bar: Progress) -> None:
        self.bar, self.task = bar, None

    def start(self, total: int, label: str) -> None:
        self.task = self.bar.add_task(label, total=total)

    def advance(self, n: int) -> None:
        self.bar.advance(self.task, n)

    def say(self, message: str) -> None:
        """Rename the bar: the work went on to another stage."""
        self.bar.update(self.task, description=message)


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


def print_extracted(summary, out: Path) -> None:
    console.print(
        f"{summary.extracted} extracted, {summary.skipped} already done, "
        f"{len(summary.failed)} failed, of {summary.total} "
        f"({summary.images_per_second:.1f} images/s) -> {escape(str(out))}"
    )
    for key, reason in summary.failed:
        console.print(f"  [yellow]skipped[/] {escape(key)}: {escape(reason)}")


def print_skipped(failed: list[tuple[str, str]], what: str = "image(s) that do not decode") -> None:
    """What a build or an add skipped (by default: images whose files do not decode)."""
    if failed:
        console.print(f"[yellow]skipped {len(failed)} {escape(what)}:[/]")
    for key, reason in failed:
        console.print(f"  {escape(key)}: {escape(reason)}")


def print_built(built, factory: str, out: Path) -> None:
    counts = ", ".join(f"{n} {name}" for name, n in built.counts.items() if n)
    console.print(escape(f"{counts} -> {out}"))
    if "states" in built.indexes:
        states = built.indexes["states"]
        console.print(
            f"kept for re-ranking: {states.nbytes / 2**20:.1f} MiB of region states "
            f"({states.nbytes / max(len(states), 1) / 1024:.0f} KiB per image; --no-states leaves them out)"
        )
    if built.recall_at_10 is not None:
        console.print(
            f"{escape(factory)}: recall@10 against exact search = {built.recall_at_10:.3f} "
            f"({built.recall_queries} sample queries)"
        )


def print_synced(report, out: Path) -> None:
    """What a sync changed, as one line a script can read, then what it wrote without
    encoding."""
    console.print(f"{report.line}; {report.total} in {escape(str(out))}", highlight=False)
    if report.touched:
        console.print(f"{report.touched} touched (same content: fields updated, not encoded)")


def print_best(best: dict, out: Path, what: str = "") -> None:
    """What a training run reached: its best val AR (per language too, for `ldot align`)."""
    if not best:
        return
    per = ", ".join(f"{k} {m['ar']:.2f}" for k, m in best.get("languages", {}).items())
    label = f"best {'mean ' if per else ''}val AR{f' {what}' if what else ''}"
    line = f"{label} {best['ar']:.2f}{f' ({per})' if per else ''} -> {out / 'best'}"
    console.print(escape(line))


def print_bank(bank, model: Path) -> None:
    src = bank.source
    # Escaped: "[val]" would otherwise be read as a style tag and vanish.
    console.print(
        escape(
            f"wrote {model / 'bank.safetensors'}: {len(bank.text)} captions and "
            f"{len(bank.image)} images of {src['annotations']} [{src['split']}], beta {bank.beta:g}"
        )
    )


def print_metrics(m: dict, json_out: Path | None = None) -> None:
    """The recalls as a table, and as JSON into `json_out` when given."""
    table = Table(title=f"{m['n_images']} images, {m['n_captions']} captions")
    for col in ("direction", "R@1", "R@5", "R@10"):
        table.add_column(col, justify="right")
    for d, name in (("t2i", "text->image"), ("i2t", "image->text")):
        table.add_row(name, *(f"{m[d][k]:.2f}" for k in ("r1", "r5", "r10")))
    table.add_row("AR", f"{m['ar']:.2f}", "", "")
    Console().print(table)
    if json_out is not None:
        _write_results(json_out, m)


def print_bench(report, json_out: Path | None = None) -> None:
    table = Table(title=f"{report.gallery} images, {report.threads} threads")
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
        _write_results(json_out, report.to_json())


def _write_results(path: Path, data: dict) -> None:
    """`--json FILE`: a folder or an unwritable place is the user's to fix, not a traceback."""
    try:
        write_json(path, data)
    except OSError as e:
        raise DataError(f"cannot write {path}: {e.strerror or e}") from e


def print_answers(labels: list[str], answers: list, as_json: bool) -> None:
    """Search results: a table per query, or JSON (one object, or a list for several)."""
    if as_json:
        payload = [
            {
                "query": q,
                "results": [dataclasses.asdict(r) for r in a.results],
                "timing_ms": a.timing_ms,
                "warnings": a.warnings,
            }
            for q, a in zip(labels, answers, strict=True)
        ]
        print(json.dumps(payload if len(payload) > 1 else payload[0], ensure_ascii=False, indent=1))
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
        for w in a.warnings:
            console.print(f"warning: {escape(q)!r}: {escape(w)}", highlight=False)


def print_demo(results: list, info: dict) -> None:
    out = Console()
    out.print(f"indexed {info['images']} photos in {info['index_s']:.2f} s")
    for r in results:
        title = f"{r.query!r}  (encode {r.encode_ms:.1f} ms, search {r.search_ms:.2f} ms)"
        table = Table(title=escape(title), title_justify="left")
        table.add_column("rank", justify="right")
        table.add_column("result")
        table.add_column("score", justify="right")
        for rank, hit in enumerate(r.hits, 1):
            table.add_row(str(rank), escape(hit.name), f"{hit.score:.3f}")
        out.print(table)

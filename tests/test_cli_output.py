"""What `lightningdot.console` prints: names from the data are shown as written, on one line."""

from pathlib import Path
from types import SimpleNamespace

import pytest

import lightningdot.console as show
from lightningdot.errors import DataError


def test_error_is_one_escaped_line(capsys):
    long = "x" * 150
    show.print_error(DataError(f"image '/a[/b]/{long}.jpg' is not a path inside [val]"))
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"error: image '/a[/b]/{long}.jpg' is not a path inside [val]\n"


def test_extracted_names_skipped_files_as_written(capsys):
    summary = SimpleNamespace(
        extracted=0,
        skipped=0,
        total=1,
        images_per_second=0.0,
        failed=[("a[/b].jpg", "image not found: imgs/a[/b].jpg")],
    )
    show.print_extracted(summary, Path("store[x]"))
    err = capsys.readouterr().err
    assert "-> store[x]\n" in err and "skipped a[/b].jpg: image not found: imgs/a[/b].jpg" in err


def test_bank_line_keeps_the_split(capsys):
    bank = SimpleNamespace(
        source={"annotations": "ann.json", "split": "val"}, text=[0] * 3, image=[0], beta=0.5
    )
    show.print_bank(bank, Path("model"))
    assert "images of ann.json [val], beta 0.5" in capsys.readouterr().err


def test_results_json_into_a_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot write"):
        show._write_results(tmp_path, {"ar": 1.0})
    show._write_results(tmp_path / "m.json", {"ar": 1.0})
    assert (tmp_path / "m.json").read_text() == '{\n  "ar": 1.0\n}\n'

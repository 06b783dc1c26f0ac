"""`ldot export` never replaces a better model by accident, and compares like with like."""

import pytest

from lightningdot.errors import DataError
from lightningdot.model.checkpoint import save_model
from lightningdot.model.encoders import BiEncoder
from lightningdot.model.export import export
from tests.helpers import tiny_model_config


def saved(folder, languages: dict[str, float]):
    m = BiEncoder(tiny_model_config())
    m.init_pretrained()
    per = {lang: {"ar": ar} for lang, ar in languages.items()}
    val = {"ar": sum(languages.values()) / len(languages), "languages": per}
    save_model(folder, m.eval(), extra={"val": val})
    return folder


def test_a_lower_val_ar_is_refused_unless_forced(tmp_path):
    out = tmp_path / "shipped"
    export(saved(tmp_path / "a", {"en": 50.0}), out, "float16")
    with pytest.raises(DataError, match=r"val AR 50.00, this one has 49.00; use --force"):
        export(saved(tmp_path / "b", {"en": 49.0}), out, "float16")
    export(tmp_path / "b", out, "float16", force=True)
    export(saved(tmp_path / "c", {"en": 51.0}), out, "float16")


def test_students_of_other_languages_are_compared_on_those_they_share(tmp_path):
    out = tmp_path / "shipped"
    export(saved(tmp_path / "two", {"en": 52.0, "zh": 36.0}), out, "float16")
    # A mean over six languages (40) is below 44, but English and Chinese are better: accepted.
    six = {"en": 52.5, "zh": 36.5, "de": 38.0, "pt": 38.0, "fr": 38.0, "cs": 37.0}
    export(saved(tmp_path / "six", six), out, "float16")
    # English and Chinese worse than the six-language one: refused, saying on what.
    with pytest.raises(DataError, match=r"44.50 on the languages both were measured on \(en, zh\)"):
        export(saved(tmp_path / "worse", {"en": 52.0, "zh": 36.0}), out, "float16")

"""cli.params: sections of params.yaml, nested ones by a dotted name."""
import pytest

from cli.params import load_section
from pipeline.errors import InputError


def test_dotted_and_optional_sections(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("pretrain:\n  models: [vsrn]\n  vsrn:\n    train:\n      epochs: 6\n")
    assert load_section(p, "pretrain.vsrn") == {"train": {"epochs": 6}}
    assert load_section(p, "pretrain")["models"] == ["vsrn"]
    assert load_section(None, "anything") == {}
    assert load_section(p, "finetune", optional=True) == {}
    for missing in ("finetune", "pretrain.vse_inf", "pretrain.models"):   # a list is no section
        with pytest.raises(InputError, match="no '"):
            load_section(p, missing)

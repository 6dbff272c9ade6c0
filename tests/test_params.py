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


@pytest.mark.parametrize("command,section,body,bad", [
    ("train", "train_base", "train_base:\n  modle: vsrn\n", "modle"),
    ("evaluate", "evaluate_base", "evaluate_base:\n  protocl: full\n", "protocl"),
    ("finetune", "finetune", "finetune:\n  models:\n    vse_inf: {init: x, trian: {}}\n", "trian"),
    ("finetune", "finetune", "finetune:\n  offcandisise: 10\n", "offcandisise"),
])
def test_unknown_params_key_is_one_line(tmp_path, capsys, command, section, body, bad):
    """The one shared unknown-key check: a typo in any section is one line, exit 2."""
    from cli.main import main

    params = tmp_path / "params.yaml"
    params.write_text(body)
    out = ["--json", str(tmp_path / "o")] if command == "evaluate" else ["--out", str(tmp_path / "o")]
    rc = main([command, "--params", str(params), "--section", section, *out])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and bad in err and str(params) in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("body", ["train_base:\n  model_options: abc\n", "train_base:\n  train: [1, 2]\n"])
def test_option_mappings_must_be_mappings(tmp_path, capsys, body):
    from cli.main import main

    params = tmp_path / "params.yaml"
    params.write_text(body)
    rc = main(["train", "--params", str(params), "--section", "train_base", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "must be a mapping" in err, err
    assert not (tmp_path / "o").exists()

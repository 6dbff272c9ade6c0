"""`itm-pipeline report`: the model x loss table and the recall plot."""
import json

from cli.main import main


def _metrics(r1: float) -> dict:
    return {"i2t_r1": r1, "i2t_r5": 98.0, "i2t_r10": 100.0, "t2i_r1": r1 - 5, "t2i_r5": 99.0,
            "t2i_r10": 100.0, "rsum": 2 * r1 - 5 + 397.0, "protocol": "full"}


def test_report_table_and_plot(tmp_path, capsys):
    m = tmp_path / "metrics"
    m.mkdir()
    for name, r1 in (("base_test", 78.0), ("vse_inf-triplet", 84.0), ("vse_inf-aoq", 86.0)):
        (m / f"{name}.json").write_text(json.dumps(_metrics(r1)))
        (m / f"{name}_groups.json").write_text(json.dumps({"family": _metrics(r1 - 1), "random": _metrics(99.0)}))
    out = tmp_path / "report"
    rc = main(["report", "--metrics-dir", str(m), "--run", "vse_inf-triplet", "--run", "vse_inf-aoq",
               "--out", str(out)])
    assert rc == 0
    lines = [ln for ln in (out / "report.md").read_text().splitlines() if ln.startswith("| ")]
    assert len(lines) == 4  # header + base + two runs
    assert lines[1].startswith("| base | (base) | 78.0 |")
    aoq = lines[3].split(" | ")
    assert aoq[0] == "| vse_inf" and aoq[1] == "aoq" and aoq[-2] == f"{2 * 86.0 - 5 + 397.0:.1f}"
    assert aoq[-1] == f"{2 * 85.0 - 5 + 397.0:.1f} |"  # within-family rsum
    assert (out / "recall.png").read_bytes()[:4] == b"\x89PNG"
    assert "vse_inf" in capsys.readouterr().out


def test_report_missing_run_is_one_line(tmp_path, capsys):
    (tmp_path / "base_test.json").write_text(json.dumps(_metrics(78.0)))
    rc = main(["report", "--metrics-dir", str(tmp_path), "--run", "vsrn-aoq", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "vsrn-aoq.json" in err
    assert not (tmp_path / "r" / "report.md").exists()


RUNS = ("finetune:\n  runs:\n    online: {}\n    offline:\n      vsrn-aoq: {model: vsrn, loss: aoq, "
        "init: artifacts/pretrain/vsrn/checkpoint, candidates: artifacts/candidates}\n")


def test_report_runs_from_params_grouped_by_model(tmp_path, capsys):
    m = tmp_path / "metrics"
    m.mkdir()
    runs = ["vse_inf-triplet", "vse_inf-aoq", "vsrn-triplet", "vsrn-offtri"]
    for name in ["base_test", *runs]:
        (m / f"{name}.json").write_text(json.dumps(_metrics(80.0)))
    params = tmp_path / "params.yaml"
    params.write_text(
        "finetune:\n  runs:\n    online:\n"
        "      vse_inf-triplet: {model: vse_inf, loss: triplet, init: a}\n"
        "      vsrn-triplet: {model: vsrn, loss: triplet, init: b}\n"
        "    offline:\n"
        "      vsrn-offtri: {model: vsrn, loss: offtri, init: b, candidates: c}\n"
        "      vse_inf-aoq: {model: vse_inf, loss: aoq, init: a, candidates: c}\n")
    assert main(["report", "--metrics-dir", str(m), "--params", str(params),
                 "--out", str(tmp_path / "r")]) == 0
    lines = [ln for ln in (tmp_path / "r" / "report.md").read_text().splitlines() if ln.startswith("| ")]
    assert [" ".join(ln.split(" | ")[:2])[2:] for ln in lines[2:]] == [r.replace("-", " ") for r in runs]
    # the model x loss grid of earlier versions: one line naming the file
    params.write_text("finetune:\n  runs:\n    model: [vsrn]\n    loss: [aoq]\n")
    capsys.readouterr()
    assert main(["report", "--metrics-dir", str(m), "--params", str(params),
                 "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(params) in err and "online" in err


def test_report_pretrained_rows_from_params(tmp_path, capsys):
    m = tmp_path / "metrics"
    m.mkdir()
    for name, r1 in (("base_test", 78.0), ("pretrain-vsrn", 40.0), ("vsrn-aoq", 45.0)):
        (m / f"{name}.json").write_text(json.dumps(_metrics(r1)))
    params = tmp_path / "params.yaml"
    params.write_text(RUNS + "pretrain:\n  models: [vsrn]\n")
    rc = main(["report", "--metrics-dir", str(m), "--params", str(params), "--out", str(tmp_path / "r")])
    assert rc == 0, capsys.readouterr().err
    lines = [ln for ln in (tmp_path / "r" / "report.md").read_text().splitlines() if ln.startswith("| ")]
    assert [ln.split(" | ")[:2] for ln in lines[1:]] == [
        ["| base", "(base)"], ["| vsrn", "(pretrain)"], ["| vsrn", "aoq"]]
    assert lines[2].split(" | ")[2] == "40.0"
    # without a pretrain section: no such row, and no error
    params.write_text(RUNS)
    assert main(["report", "--metrics-dir", str(m), "--params", str(params),
                 "--out", str(tmp_path / "r2")]) == 0
    assert "(pretrain)" not in (tmp_path / "r2" / "report.md").read_text()


def test_report_ensemble_rows_from_params(tmp_path, capsys):
    m = tmp_path / "metrics"
    m.mkdir()
    for name, r1 in (("base_test", 78.0), ("vsrn-aoq", 45.0), ("ensemble-sgraf", 50.0)):
        (m / f"{name}.json").write_text(json.dumps(
            {**_metrics(r1), "members": [{"model": "sgr"}, {"model": "saf"}]}))
    params = tmp_path / "params.yaml"
    params.write_text(RUNS + "ensembles:\n  sgraf: {a: p/sgr, b: p/saf}\n")
    rc = main(["report", "--metrics-dir", str(m), "--params", str(params), "--out", str(tmp_path / "r")])
    assert rc == 0, capsys.readouterr().err
    lines = [ln for ln in (tmp_path / "r" / "report.md").read_text().splitlines() if ln.startswith("| ")]
    assert [ln.split(" | ")[:3] for ln in lines[1:]] == [
        ["| base", "(base)", "78.0"], ["| vsrn", "aoq", "45.0"],
        ["| ensemble sgraf", "(mean of sgr + saf)", "50.0"]]
    # a listed ensemble whose metrics are missing: one line naming the file
    params.write_text(RUNS + "ensembles:\n  other: {a: x, b: y}\n")
    assert main(["report", "--metrics-dir", str(m), "--params", str(params),
                 "--out", str(tmp_path / "r2")]) == 2
    assert "ensemble-other.json" in capsys.readouterr().err

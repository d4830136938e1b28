"""The report: the paper's Table I/II layout, DER and the retuning column from fixture summaries."""
import csv
import json

import pytest

from utils.analysis.report import der, main


def metrics(acc, asr, ra=0.0):
    return {"test_acc": acc, "test_asr": asr, "test_ra": ra}


def put(root, record, method, before, after, *, attack=None, dataset="fashion_mnist",
        model="smallcnn", retune=None):
    """A record folder with one defense summary (and attack_summary.json when `attack`)."""
    folder = root / record
    (folder / "defense" / method).mkdir(parents=True, exist_ok=True)
    if attack:
        (folder / "attack_summary.json").write_text(json.dumps(
            {"attack": attack, "dataset": dataset, "model": model}))
    summary = {"method": method, "record": f"record/{record}", "dataset": dataset, "model": model,
               "before": before, "after": after, "times_s": {"total": 1.0}}
    if retune:
        summary["retune"] = retune
    (folder / "defense" / method / "summary.json").write_text(json.dumps(summary))


@pytest.fixture()
def records(tmp_path):
    root = tmp_path / "record"
    put(root, "bn", "ulrl", metrics(0.90, 0.99), metrics(0.88, 0.01), attack="badnet",
        retune=metrics(0.85, 0.60))
    put(root, "bn", "ft", metrics(0.90, 0.99), metrics(0.91, 0.50), attack="badnet")
    put(root, "bl", "ulrl", metrics(0.80, 0.95), metrics(0.79, 0.05), attack="blended")
    put(root, "m1", "ulrl", metrics(0.97, 0.90), metrics(0.96, 0.00), dataset="mnist")  # no attack file
    put(root, "v1", "ulrl", metrics(0.70, 0.80), metrics(0.70, 0.10), attack="badnet",
        model="vgg19_bn")
    return root


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_der_is_backdoorbench_definition():
    assert der(metrics(0.90, 0.99), metrics(0.88, 0.01)) == pytest.approx(100 * (0.98 - 0.02 + 1) / 2)
    # a C-ACC gain is not rewarded and an ASR rise is not penalized beyond 0 (the max(0, .) terms)
    assert der(metrics(0.90, 0.99), metrics(0.91, 0.50)) == pytest.approx(100 * (0.49 + 1) / 2)
    assert der(metrics(0.90, 0.10), metrics(0.90, 0.30)) == pytest.approx(50.0)


def test_table_rows_columns_averages_and_retune(records, tmp_path, capsys):
    assert main([str(records), "--out", str(tmp_path / "t")]) == 0
    rows = read_csv(tmp_path / "t.csv")
    small = [r for r in rows if r["model"] == "smallcnn"]
    assert [(r["dataset"], r["attack"]) for r in small] == [
        ("fashion_mnist", "badnet"), ("fashion_mnist", "blended"), ("fashion_mnist", "Average"),
        ("mnist", "m1"), ("mnist", "Average")]  # attack falls back to the record name
    badnet = small[0]
    assert float(badnet["no_defense_acc"]) == pytest.approx(90.0)
    assert float(badnet["no_defense_asr"]) == pytest.approx(99.0)
    assert float(badnet["ulrl_acc_change"]) == pytest.approx(-2.0)  # defended minus undefended
    assert float(badnet["ulrl_asr"]) == pytest.approx(1.0)
    assert float(badnet["ulrl_der"]) == pytest.approx(98.0)
    assert float(badnet["ulrl_retune_asr"]) == pytest.approx(60.0)
    assert float(badnet["ft_acc_change"]) == pytest.approx(1.0)
    blended, average = small[1], small[2]
    assert blended["ft_asr"] == "" and blended["ulrl_retune_asr"] == ""  # not run: left empty
    assert float(average["ulrl_asr"]) == pytest.approx((1.0 + 5.0) / 2)
    assert float(average["ft_asr"]) == pytest.approx(50.0)  # over the rows that have it
    assert float(average["no_defense_acc"]) == pytest.approx(85.0)
    assert "ft_retune_asr" not in rows[0]  # no ft run was retuned: no column

    md = (tmp_path / "t.md").read_text()
    assert md == capsys.readouterr().out.split("written")[0].rstrip("\n") + "\n"
    assert "### smallcnn" in md and "### vgg19_bn" in md  # one table per model, like Tables I/II
    assert "| ft ΔC-ACC | ft ASR | ft DER | ulrl ΔC-ACC | ulrl ASR | ulrl DER | ulrl ASR after " \
           "retune |" in md
    assert "| fashion_mnist | badnet | bn | 90.00 | 99.00 | +1.00 | 50.00 | 74.50 | -2.00 | " \
           "1.00 | 98.00 | 60.00 |" in md
    assert "|  | blended | bl | 80.00 | 95.00 | – | – | – | -1.00 | 5.00 | 94.50 | – |" in md


def test_defenses_option_picks_and_orders_columns(records, tmp_path):
    main([str(records), "--out", str(tmp_path / "t"), "--defenses", "ulrl", "ft"])
    header = (tmp_path / "t.csv").read_text().splitlines()[0].split(",")
    assert header.index("ulrl_asr") < header.index("ft_asr")
    main([str(records), "--out", str(tmp_path / "u"), "--defenses", "ulrl"])
    assert "ft_asr" not in (tmp_path / "u.csv").read_text()


def test_default_output_goes_into_the_folder_given(records):
    main([str(records)])
    assert (records / "report.md").is_file() and (records / "report.csv").is_file()


def test_summary_files_print_one_line_each(records, capsys):
    assert main([str(records / "bn/defense/ulrl/summary.json"),
                 str(records / "bn/defense/ft/summary.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith("bn ") for line in lines)
    assert "retuned ASR  60.00" in lines[1] and "ASR  99.00 ->   1.00" in lines[1]
    assert not (records / "report.md").exists()


def test_no_result_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 1
    assert "no defense results" in capsys.readouterr().err


def test_metrics_option_adds_ra_and_defense_time(tmp_path):
    root = tmp_path / "record"
    put(root, "bn", "ulrl", metrics(0.90, 0.99, 0.01), metrics(0.88, 0.01, 0.85), attack="badnet",
        retune=metrics(0.85, 0.60))
    summary_file = root / "bn/defense/ulrl/summary.json"
    summary = json.loads(summary_file.read_text())
    summary["times_s"] = {"total": 12.5, "retune": 2.5}
    summary_file.write_text(json.dumps(summary))
    assert main([str(root), "--out", str(tmp_path / "t"), "--metrics", "acc", "asr", "ra",
                 "time"]) == 0
    row = read_csv(tmp_path / "t.csv")[0]
    assert [k for k in row if k.startswith("ulrl_")] == ["ulrl_acc", "ulrl_asr", "ulrl_ra",
                                                         "ulrl_time"]
    assert float(row["ulrl_ra"]) == pytest.approx(85.0) and float(row["ulrl_time"]) == 10.0
    assert "| ulrl time (s) |" in (tmp_path / "t.md").read_text()


def test_compact_puts_a_defense_in_one_cell(records, tmp_path):
    assert main([str(records), "--out", str(tmp_path / "t"), "--defenses", "ulrl", "ft",
                 "--compact"]) == 0
    text = (tmp_path / "t.md").read_text()
    assert "| ulrl ΔC-ACC / ASR / DER / ASR after retune | ft ΔC-ACC / ASR / DER |" in text
    badnet = next(line for line in text.splitlines() if "| badnet |" in line)
    assert "| 90.00 / 99.00 | -2.00 / 1.00 / 98.00 / 60.00 | +1.00 / 50.00 / 74.50 |" in badnet
    assert "ft_asr" in read_csv(tmp_path / "t.csv")[0]  # the CSV keeps one column per value


def test_update_replaces_the_rerun_records_rows_and_keeps_the_others(records, tmp_path):
    main([str(records), "--out", str(tmp_path / "old")])
    rerun = tmp_path / "rerun"
    put(rerun, "bl", "ulrl", metrics(0.80, 0.95), metrics(0.78, 0.15), attack="blended")
    assert main([str(rerun), "--out", str(tmp_path / "new"), "--update",
                 str(tmp_path / "old.csv")]) == 0
    old, new = read_csv(tmp_path / "old.csv"), read_csv(tmp_path / "new.csv")
    small = [r for r in new if r["model"] == "smallcnn"]
    assert [(r["dataset"], r["attack"]) for r in small] == [
        ("fashion_mnist", "badnet"), ("fashion_mnist", "blended"), ("fashion_mnist", "Average"),
        ("mnist", "m1"), ("mnist", "Average")]
    assert small[0] == old[0]  # badnet: kept as it was
    assert float(small[1]["ulrl_asr"]) == pytest.approx(15.0)  # blended: the rerun's
    assert float(small[2]["ulrl_asr"]) == pytest.approx((1.0 + 15.0) / 2)  # recomputed
    assert float(small[2]["ft_asr"]) == pytest.approx(50.0)
    assert [r["attack"] for r in new if r["model"] == "vgg19_bn"] == ["badnet", "Average"]


def test_update_keeps_the_cells_of_defenses_not_rerun_unless_the_record_was_remade(records, tmp_path,
                                                                                   capsys):
    main([str(records), "--out", str(tmp_path / "old")])
    rerun = tmp_path / "rerun"  # FT again on the same badnet model, FT on a remade blended one
    put(rerun, "bn", "ft", metrics(0.90, 0.99), metrics(0.89, 0.20), attack="badnet")
    put(rerun, "bl", "ft", metrics(0.81, 0.95), metrics(0.80, 0.40), attack="blended")
    capsys.readouterr()
    assert main([str(rerun), "--out", str(tmp_path / "new"), "--update",
                 str(tmp_path / "old.csv")]) == 0
    assert "bl: its No Defense C-ACC / ASR differ" in capsys.readouterr().err
    new = {r["attack"]: r for r in read_csv(tmp_path / "new.csv")
           if r["model"] == "smallcnn" and r["dataset"] == "fashion_mnist"}
    assert float(new["badnet"]["ft_asr"]) == pytest.approx(20.0)  # the rerun's
    assert float(new["badnet"]["ulrl_asr"]) == pytest.approx(1.0)  # kept: same model
    assert float(new["badnet"]["ulrl_retune_asr"]) == pytest.approx(60.0)
    assert new["blended"]["ulrl_asr"] == "" and float(new["blended"]["ft_asr"]) == 40.0
    assert float(new["Average"]["ulrl_asr"]) == pytest.approx(1.0)  # over the rows that have it


def test_complete_keeps_the_records_every_defense_ran_on(records, tmp_path):
    assert main([str(records), "--out", str(tmp_path / "t"), "--complete"]) == 0
    small = [r for r in read_csv(tmp_path / "t.csv") if r["model"] == "smallcnn"]
    assert [r["attack"] for r in small] == ["badnet", "Average"]  # only badnet has ulrl and ft
    assert float(small[1]["ulrl_asr"]) == pytest.approx(1.0)


LONG_COLUMNS = ["record", "dataset", "model", "attack", "defense", "metric", "value", "unit"]


def test_long_is_one_row_per_record_defense_metric_in_fractions(records, tmp_path):
    assert main([str(records), "--out", str(tmp_path / "t"), "--long"]) == 0
    with open(tmp_path / "t.csv", newline="") as f:
        header = next(csv.reader(f))
    rows = read_csv(tmp_path / "t.csv")
    assert header == LONG_COLUMNS
    keys = [(r["record"], r["defense"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys))  # tidy: one value per record, defense and metric
    assert not any("Average" in r.values() for r in rows) and all(r["record"] for r in rows)
    assert len(rows) == 5 * 9 + 3  # 9 values for each of the 5 runs, 3 more for the retuned one
    value = {key: float(r["value"]) for key, r in zip(keys, rows)}
    assert value["bn", "ulrl", "before_test_acc"] == pytest.approx(0.90)
    assert value["bn", "ulrl", "after_test_asr"] == pytest.approx(0.01)
    assert value["bn", "ulrl", "after_test_ra"] == pytest.approx(0.0)
    assert value["bn", "ulrl", "acc_change"] == pytest.approx(-0.02)
    assert value["bn", "ulrl", "der"] == pytest.approx(0.98)
    assert value["bn", "ulrl", "retune_test_asr"] == pytest.approx(0.60)
    assert value["bn", "ulrl", "time_s"] == 1.0
    assert ("bn", "ft", "retune_test_asr") not in value  # no retuning check ran: no row
    assert all(-1 <= float(r["value"]) <= 1 for r in rows if r["unit"] == "fraction")
    assert {r["unit"] for r in rows if r["metric"] == "time_s"} == {"s"}
    m1 = next(r for r in rows if r["record"] == "m1")
    assert (m1["dataset"], m1["model"], m1["attack"]) == ("mnist", "smallcnn", "m1")
    assert "| Average |" in (tmp_path / "t.md").read_text()  # averages: the Markdown only


def test_long_loads_in_pandas_as_a_tidy_table(records, tmp_path):
    pandas = pytest.importorskip("pandas")
    main([str(records), "--out", str(tmp_path / "t"), "--long"])
    frame = pandas.read_csv(tmp_path / "t.csv")
    assert list(frame.columns) == LONG_COLUMNS and frame["value"].dtype == float
    wide = frame.pivot(index=["record", "defense"], columns="metric", values="value")
    assert wide.loc[("bn", "ulrl"), "der"] == pytest.approx(0.98)


def test_long_takes_defenses_and_summary_files_and_refuses_update_and_lines(records, tmp_path, capsys):
    assert main([str(records), "--out", str(tmp_path / "t"), "--long", "--defenses", "ft"]) == 0
    assert {r["defense"] for r in read_csv(tmp_path / "t.csv")} == {"ft"}
    assert main([str(records / "bn/defense/ulrl/summary.json"), "--long",
                 "--out", str(tmp_path / "f")]) == 0  # a file given by name: the tidy rows too
    assert {r["record"] for r in read_csv(tmp_path / "f.csv")} == {"bn"}
    with pytest.raises(SystemExit) as exit_:
        main([str(records), "--long", "--update", str(tmp_path / "t.csv")])
    assert exit_.value.code == 2 and "does not combine with --long" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([str(records), "--long", "--lines"])  # --long is a table mode, not lines
    assert exit_.value.code == 2 and "not allowed with argument --long" in capsys.readouterr().err

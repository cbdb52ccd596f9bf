"""The trade-off frontier: collection from run folders, seed summaries, the Pareto front, equal-clean
interpolation and comparison, tables, the figure and the script, all on synthetic runs."""
import json
import math
import random
import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from neurosens.frontier import (Point, Summary, collect, compare, comparison_table, find_runs, method_front, pareto_front,
                                points_table, robust_at_clean, summarize)
from neurosens.plots import plot_frontier
from neurosens.report import Z95

ROOT = Path(__file__).resolve().parents[1]


def make_run(root, name, method, seed, clean, results, eval_eps=0.3, n=500, **config):
    """A run folder as `neurosens train` and `neurosens eval --json` leave it (only what is read)."""
    folder = root / name
    folder.mkdir(parents=True)
    config = {"method": method, "seed": seed, "eps": 0.3, "beta": 6.0, "sns_lam": 1.0, "alp_lam": 1.0} | config
    (folder / "config.json").write_text(json.dumps({"config": config, "meta": {"data": "mnist"}}))
    rows = {"clean": {"accuracy": clean, "seconds": 0.1}} | {k: {"accuracy": v, "seconds": 1.0} for k, v in results.items()}
    (folder / "eval.json").write_text(json.dumps({"checkpoint": str(folder / "model.pt"), "data": "mnist", "n": n,
                                                  "eps": eval_eps, "norm": "linf", "steps": 40, "results": rows}))
    return folder


def summary(method, value, clean, robust, se=0.01):
    return Summary(method, "k", value, (0,), clean, robust, se, se, 500)


def test_collect_reads_method_knob_seed_and_accuracies(tmp_path):
    make_run(tmp_path, "a", "sns", 1, 0.93, {"pgd-40": 0.55, "autoattack": 0.41}, sns_lam=3.0)
    make_run(tmp_path, "b", "pgd_at", 0, 0.95, {"pgd-40": 0.50, "autoattack": 0.38}, eps=0.2)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text(json.dumps({"config": {"method": "trades", "beta": 1.0}}))  # still training
    (tmp_path / "notes").mkdir()  # not a run folder
    evaluated, pending = find_runs(tmp_path)
    assert [p.name for p in evaluated] == ["a", "b"] and [p.name for p in pending] == ["c"]
    sns, pgd = collect(evaluated, "autoattack")
    assert (sns.method, sns.knob, sns.value, sns.seed) == ("sns", "sns_lam", 3.0, 1)
    assert (sns.clean, sns.robust, sns.n) == (0.93, 0.41, 500)
    assert (pgd.method, pgd.knob, pgd.value, pgd.clean, pgd.robust) == ("pgd_at", "eps", 0.2, 0.95, 0.38)
    assert collect(evaluated, "pgd-40")[0].robust == 0.55


@pytest.mark.parametrize("case, message", [
    ("no attack", "no 'cw-40' result (it has clean, pgd-40)"),
    ("other eps", "evaluated differently"),
    ("unknown method", "method 'standard' has no knob to sweep"),
    ("not a run", "no config.method"),
    ("bad json", "not valid JSON"),
    ("missing eval", "eval.json: missing"),
    ("eval not a dict", "eval.json: not the output of `neurosens eval --json`"),
    ("eval without n", "eval.json: no results or n"),
    ("no seed", "no config.method or config.seed"),
    ("other data", "data=fashion-mnist"),
])
def test_collect_bad_inputs_give_one_line_errors(tmp_path, case, message):
    folders = [make_run(tmp_path, "a", "sns", 0, 0.9, {"pgd-40": 0.5})]
    attack = "cw-40" if case == "no attack" else "pgd-40"
    if case == "other eps":
        folders.append(make_run(tmp_path, "b", "trades", 0, 0.9, {"pgd-40": 0.5}, eval_eps=0.2))
    elif case == "unknown method":
        folders.append(make_run(tmp_path, "b", "standard", 0, 0.99, {"pgd-40": 0.0}))
    elif case == "not a run":
        (folders[0] / "config.json").write_text(json.dumps({"epochs": 3}))
    elif case == "bad json":
        (folders[0] / "eval.json").write_text("{")
    elif case == "missing eval":
        (folders[0] / "eval.json").unlink()
    elif case == "eval not a dict":
        (folders[0] / "eval.json").write_text("[0.9, 0.5]")
    elif case == "eval without n":
        (folders[0] / "eval.json").write_text(json.dumps({"results": {"clean": {"accuracy": 0.9}}}))
    elif case == "no seed":
        (folders[0] / "config.json").write_text(json.dumps({"config": {"method": "sns", "sns_lam": 1.0}}))
    elif case == "other data":
        folder = make_run(tmp_path, "b", "trades", 0, 0.9, {"pgd-40": 0.5})
        report = json.loads((folder / "eval.json").read_text())
        (folder / "eval.json").write_text(json.dumps(report | {"data": "fashion-mnist"}))
        folders.append(folder)
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        collect(folders, attack)
    assert "\n" not in str(err.value)


def test_collect_and_front_reject_empty_and_malformed_inputs(tmp_path):
    with pytest.raises(ValueError, match="no run folders"):
        collect([], "pgd-40")
    with pytest.raises(ValueError, match="not a directory"):
        find_runs(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"pairs\[1\]"):
        pareto_front([(0.9, 0.5), (0.9, math.nan)])
    with pytest.raises(ValueError, match="clean=1.5"):
        robust_at_clean([summary("sns", 1, 0.9, 0.5)], 1.5)


def test_summaries_average_seeds_with_the_documented_standard_error(tmp_path):
    clean, robust = [0.90, 0.94, 0.92], [0.50, 0.46, 0.55]
    for seed, (c, r) in enumerate(zip(clean, robust)):
        make_run(tmp_path, f"sns-{seed}", "sns", seed, c, {"pgd-40": r})
    make_run(tmp_path, "trades", "trades", 0, 0.97, {"pgd-40": 0.30}, beta=1.0)
    sns, trades = summarize(collect(find_runs(tmp_path)[0], "pgd-40"))
    assert sns.seeds == (0, 1, 2) and trades.seeds == (0,)
    for values, mean, se in ((clean, sns.clean, sns.clean_se), (robust, sns.robust, sns.robust_se)):
        m = np.mean(values)
        assert mean == pytest.approx(m)
        assert se == pytest.approx(np.sqrt(m * (1 - m) / 500 + np.var(values, ddof=1) / 3))
    assert trades.robust_se == pytest.approx(np.sqrt(0.3 * 0.7 / 500))  # one seed: the test sample alone
    assert trades.label == "beta 1" and sns.label == "lambda 1"


def test_summaries_refuse_a_seed_twice_and_mixed_test_sets(tmp_path):
    make_run(tmp_path, "a", "sns", 0, 0.9, {"pgd-40": 0.5})
    make_run(tmp_path, "b", "sns", 0, 0.9, {"pgd-40": 0.5})
    with pytest.raises(ValueError, match="the same seed twice"):
        summarize(collect(find_runs(tmp_path)[0], "pgd-40"))
    points = [Point("sns", "sns_lam", 1.0, seed, 0.9, 0.5, n, f"run{seed}") for seed, n in ((0, 500), (1, 1000))]
    with pytest.raises(ValueError, match="different numbers of images"):
        summarize(points)


def test_pareto_front_matches_a_hand_computation():
    pairs = [(0.90, 0.50), (0.95, 0.40), (0.85, 0.45), (0.90, 0.50), (0.99, 0.10), (0.80, 0.60), (0.95, 0.30)]
    # (0.85, 0.45) loses to (0.90, 0.50); (0.95, 0.30) to (0.95, 0.40); the second (0.90, 0.50) repeats the first.
    assert pareto_front(pairs) == [5, 0, 1, 4]


def test_pareto_front_is_exactly_the_undominated_points():
    rng = random.Random(0)
    pairs = [(round(rng.random(), 1), round(rng.random(), 1)) for _ in range(60)]
    front = set(pareto_front(pairs))
    a = np.array(pairs)
    for i in range(len(pairs)):
        dominated = np.any(np.all(a >= a[i], axis=1) & np.any(a > a[i], axis=1))
        first_copy = not np.any(np.all(a[:i] == a[i], axis=1))
        assert (i in front) == (not dominated and first_copy)


def test_robust_at_clean_interpolates_linearly_and_never_extrapolates():
    # Three points on robust = 2.3 - 2 * clean.
    front = [summary("m", v, c, 2.3 - 2 * c, se) for v, c, se in ((1, 0.90, 0.02), (2, 0.93, 0.01), (3, 0.95, 0.03))]
    for clean in (0.90, 0.91, 0.925, 0.93, 0.94, 0.95):
        assert robust_at_clean(front, clean)[0] == pytest.approx(2.3 - 2 * clean)
    # Midway between 0.93 and 0.95: se = sqrt(0.5^2 0.01^2 + 0.5^2 0.03^2); at a point, that point's se.
    assert robust_at_clean(front, 0.94)[1] == pytest.approx(0.5 * math.sqrt(0.01 ** 2 + 0.03 ** 2))
    assert robust_at_clean(front, 0.91)[1] == pytest.approx(math.hypot(2 / 3 * 0.02, 1 / 3 * 0.01))
    assert robust_at_clean(front, 0.93)[1] == pytest.approx(0.01)
    # With the clean errors (here equal to the robust ones) and slope -2: (1 + 2^2) times the variance.
    assert robust_at_clean(front, 0.94, clean_error=True)[1] == pytest.approx(math.sqrt(5 * 0.25 * (0.01 ** 2 + 0.03 ** 2)))
    assert robust_at_clean(front, 0.94, clean_error=True)[0] == pytest.approx(2.3 - 2 * 0.94)
    assert all(math.isnan(v) for v in robust_at_clean(front, 0.96) + robust_at_clean(front, 0.89))
    with pytest.raises(ValueError, match="sorted by strictly increasing"):
        robust_at_clean(front[::-1], 0.92)


def test_compare_at_equal_clean_accuracy_over_the_overlap():
    # sns lies on robust = 1.5 - clean, pgd_at on robust = 1.4 - clean: 10 points less at any clean accuracy.
    rows = [summary("sns", v, c, 1.5 - c) for v, c in ((1, 0.90), (2, 0.92), (3, 0.96))]
    rows += [summary("pgd_at", v, c, 1.4 - c) for v, c in ((1, 0.91), (2, 0.94), (3, 0.99))]
    rows.append(summary("pgd_at", 4, 0.93, 0.2))  # off the front: ignored
    assert [s.value for s in method_front(rows, "pgd_at")] == [1, 2, 3]
    result = compare(rows, "sns", clean_error=False)
    # The overlap is [0.91, 0.96]; its knots are 0.91, 0.92, 0.94, 0.96.
    assert [c.clean for c in result] == [0.91, 0.92, 0.94, 0.96]
    for c in result:
        assert (c.method, c.other) == ("sns", "pgd_at")
        assert c.diff == pytest.approx(0.1) and c.robust == pytest.approx(1.5 - c.clean)
    # At 0.94: sns is 1/2 of the way from 0.92 to 0.96, pgd_at exactly on a point.
    assert result[2].se == pytest.approx(math.hypot(0.5 * math.hypot(0.01, 0.01), 0.01))
    # With the clean errors and slope -1: sns's variance doubles, and so does pgd_at's at its point
    # (read as the end of its segment from 0.91): 2 * 0.5e-4 + 2 * 1e-4.
    assert compare(rows, "sns")[2].se == pytest.approx(math.sqrt(3e-4))
    assert compare([summary("sns", 1, 0.9, 0.5), summary("trades", 1, 0.95, 0.4)], "sns") == []
    with pytest.raises(ValueError, match="method='alp': no runs"):
        compare(rows, "alp")


def test_tables_show_percentages_and_95_percent_intervals():
    rows = [summary("sns", 1, 0.9, 0.5, se=0.01), summary("sns", 3, 0.85, 0.45, se=0.02)]
    table = points_table(rows, "autoattack").splitlines()
    assert table[0] == "| method | knob | seeds | clean | autoattack | on front |"
    assert table[2] == f"| sns | k 1 | 0 | 90.0 ± {100 * Z95 * 0.01:.1f} | 50.0 ± {100 * Z95 * 0.01:.1f} | yes |"
    assert table[3].endswith("| no |")
    rows.append(summary("trades", 1, 0.9, 0.4, se=0.01))
    line = comparison_table(compare(rows, "sns"), "pgd-40").splitlines()[2]
    assert line == f"| 90.0 | 50.0 | trades | 40.0 | +10.0 ± {100 * Z95 * math.hypot(0.01, 0.01):.1f} |"


def test_plot_frontier_writes_a_png_with_one_curve_per_method(tmp_path):
    rows = [summary("sns", v, c, 1.5 - c) for v, c in ((1, 0.90), (2, 0.92))] + [summary("trades", 6, 0.95, 0.3)]
    fig = plot_frontier(rows, tmp_path / "sub" / "frontier.png", title="t", attack="pgd-40")
    assert (tmp_path / "sub" / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["sns", "trades"]
    assert ax.get_ylabel() == "pgd-40 accuracy (%)"
    with pytest.raises(ValueError, match="no summaries"):
        plot_frontier([])


def test_script_prints_tables_and_a_one_line_error(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    make_run(runs, "s1", "sns", 0, 0.90, {"pgd-40": 0.60})
    make_run(runs, "s2", "sns", 0, 0.94, {"pgd-40": 0.52}, sns_lam=0.3)
    make_run(runs, "p1", "pgd_at", 0, 0.92, {"pgd-40": 0.50}, eps=0.4)

    def script(*args):
        monkeypatch.setattr(sys, "argv", ["frontier.py", str(runs), *args])
        runpy.run_path(str(ROOT / "scripts" / "frontier.py"), run_name="__main__")

    script("--attack", "pgd-40", "--plot", str(tmp_path / "f.png"))
    # sns at 0.92 clean: halfway between 60% and 52%, 56%; pgd_at 50%.
    assert "| 92.0 | 56.0 | pgd_at | 50.0 | +6.0 ± " in capsys.readouterr().out
    assert (tmp_path / "f.png").is_file()
    with pytest.raises(SystemExit) as failed:
        script()
    assert failed.value.code == f"frontier: {runs / 'p1' / 'eval.json'}: no 'autoattack' result (it has clean, pgd-40)"

"""The clean/robust trade-off frontier of trained runs.

A single robust accuracy hides what it cost in clean accuracy. Sweep a method's knob (PGD-AT's
training eps, TRADES's beta, SNS's lambda), evaluate every model the same way (``neurosens eval
--json``), then:

* :func:`collect` reads one (clean, robust) :class:`Point` per run folder: the method and knob
  value from the run's ``config.json``, the accuracies from its evaluation JSON;
* :func:`summarize` averages the seeds of each (method, value) into a :class:`Summary` with a
  standard error;
* :func:`pareto_front` keeps the points no other point beats on both accuracies;
* :func:`robust_at_clean` reads a method's front at a given clean accuracy (linear interpolation,
  never extrapolation), and :func:`compare` asks, at equal clean accuracy, how much more robust one
  method is than the others;
* :func:`points_table`, :func:`comparison_table` write them as markdown;
  :func:`neurosens.plots.plot_frontier` draws them.
"""
import dataclasses
import json
import math
from pathlib import Path

from .report import Z95

#: The knob each method's sweep turns: the ``TrainConfig`` field read from the run's config.
KNOBS = {"pgd_at": "eps", "trades": "beta", "sns": "sns_lam", "alp": "alp_lam"}
#: How figures and tables write each knob.
KNOB_LABELS = {"eps": "train eps", "beta": "beta", "sns_lam": "lambda", "alp_lam": "lambda"}
CONFIG = "config.json"
EVAL = "eval.json"


@dataclasses.dataclass(frozen=True)
class Point:
    """One evaluated run: ``clean`` and ``robust`` are accuracies in [0, 1] on the first ``n`` test
    images; ``value`` is the run's ``knob``."""

    method: str
    knob: str
    value: float
    seed: int
    clean: float
    robust: float
    n: int
    run: str


@dataclasses.dataclass(frozen=True)
class Summary:
    """The seeds of one (method, knob value): mean accuracies and their standard errors.

    A standard error adds the test-sample variance of an accuracy, ``p (1 - p) / n`` (the seeds
    share the test images, so averaging them does not shrink it), and the variance over seeds
    divided by their number (absent with one seed: the training noise is then not measured)."""

    method: str
    knob: str
    value: float
    seeds: tuple
    clean: float
    robust: float
    clean_se: float
    robust_se: float
    n: int

    @property
    def label(self):
        return f"{KNOB_LABELS.get(self.knob, self.knob)} {self.value:g}"


def find_runs(root, eval_name=EVAL):
    """The run folders (holding ``config.json``) directly under ``root``, split into those with the
    evaluation file ``eval_name`` and those still without it: ``(evaluated, pending)``, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory of run folders")
    folders = sorted(p for p in root.iterdir() if (p / CONFIG).is_file())
    return [p for p in folders if (p / eval_name).is_file()], [p for p in folders if not (p / eval_name).is_file()]


def _read_json(path, what):
    try:
        content = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: missing") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path}: not {what}")
    return content


def _point(folder, attack, eval_name, knobs):
    folder = Path(folder)
    config = _read_json(folder / CONFIG, "the config of a `neurosens train` run").get("config")
    if not isinstance(config, dict) or "method" not in config or "seed" not in config:
        raise ValueError(f"{folder / CONFIG}: no config.method or config.seed; not the config of a `neurosens train` run")
    method = config["method"]
    if method not in knobs:
        raise ValueError(f"{folder}: method {method!r} has no knob to sweep; expected one of {', '.join(knobs)}")
    knob = knobs[method]
    if not isinstance(config.get(knob), (int, float)):
        raise ValueError(f"{folder / CONFIG}: no number for {knob!r}, the knob of {method}")
    report = _read_json(folder / eval_name, "the output of `neurosens eval --json`")
    results = report.get("results")
    if not isinstance(results, dict) or not isinstance(report.get("n"), int):
        raise ValueError(f"{folder / eval_name}: no results or n; not the output of `neurosens eval --json`")
    for name in ("clean", attack):
        if name not in results:
            raise ValueError(f"{folder / eval_name}: no {name!r} result (it has {', '.join(results) or 'none'})")
    point = Point(method, knob, float(config[knob]), int(config["seed"]), float(results["clean"]["accuracy"]),
                  float(results[attack]["accuracy"]), report["n"], str(folder))
    return point, (report.get("data"), report.get("eps"), report.get("norm"), point.n)


def collect(folders, attack, eval_name=EVAL, knobs=None):
    """One :class:`Point` per run folder: clean accuracy and accuracy under ``attack`` (a key of
    the evaluation's ``results``, e.g. ``"autoattack"`` or ``"pgd-40"``) from
    ``<folder>/<eval_name>``, method, knob value and seed from ``<folder>/config.json``.

    ``knobs`` maps a method to its knob (default :data:`KNOBS`). Every run must have been
    evaluated on the same images (data set and ``n``) at the same eps and norm, or the points are
    not comparable."""
    knobs = KNOBS if knobs is None else knobs
    folders = list(folders)
    if not folders:
        raise ValueError("no run folders to collect")
    points, settings = [], {}
    for folder in folders:
        point, setting = _point(folder, attack, eval_name, knobs)
        points.append(point)
        settings.setdefault(setting, point.run)
    if len(settings) > 1:
        shown = "; ".join(f"{run}: data={s[0]} eps={s[1]} norm={s[2]} n={s[3]}" for s, run in settings.items())
        raise ValueError(f"the runs were evaluated differently ({shown}); evaluate them all on one data set, eps, norm and -n")
    return points


def _check_accuracy(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{what}={value!r}: must be an accuracy in [0, 1]")


def summarize(points):
    """The points grouped by (method, knob value), seeds averaged, sorted by method then value."""
    groups = {}
    for p in points:
        _check_accuracy(p.clean, f"{p.run}: clean")
        _check_accuracy(p.robust, f"{p.run}: robust")
        groups.setdefault((p.method, p.knob, p.value), []).append(p)
    summaries = []
    for (method, knob, value), group in sorted(groups.items(), key=lambda item: (item[0][0], item[0][2])):
        seeds = tuple(sorted(p.seed for p in group))
        if len(set(seeds)) < len(seeds):
            runs = ", ".join(p.run for p in group)
            raise ValueError(f"{method} {knob}={value:g}: the same seed twice ({runs})")
        if len({p.n for p in group}) > 1:
            raise ValueError(f"{method} {knob}={value:g}: seeds evaluated on different numbers of images "
                             f"({', '.join(f'{p.run}: n={p.n}' for p in group)})")
        n = group[0].n
        stats = []
        for values in ([p.clean for p in group], [p.robust for p in group]):
            mean = sum(values) / len(values)
            seed_var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values) if len(values) > 1 else 0.0
            stats.append((mean, math.sqrt(mean * (1 - mean) / n + seed_var)))
        (clean, clean_se), (robust, robust_se) = stats
        summaries.append(Summary(method, knob, value, seeds, clean, robust, clean_se, robust_se, n))
    return summaries


def pareto_front(pairs):
    """Indices of the (clean, robust) ``pairs`` no other pair matches or beats on both and beats on
    one, in order of increasing clean accuracy (of equal pairs, the first is kept)."""
    pairs = [tuple(p) for p in pairs]
    for i, p in enumerate(pairs):
        if len(p) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in p):
            raise ValueError(f"pairs[{i}]={p!r}: must be a finite (clean, robust) pair")
    front = []
    for i, (c, r) in enumerate(pairs):
        beaten = any((c2 >= c and r2 >= r and (c2 > c or r2 > r)) or ((c2, r2) == (c, r) and j < i)
                     for j, (c2, r2) in enumerate(pairs) if j != i)
        if not beaten:
            front.append(i)
    return sorted(front, key=lambda i: pairs[i][0])


def method_front(summaries, method):
    """The summaries of ``method`` on its own Pareto front, by increasing clean accuracy."""
    rows = [s for s in summaries if s.method == method]
    if not rows:
        raise ValueError(f"method={method!r}: no runs (have {', '.join(sorted({s.method for s in summaries})) or 'none'})")
    return [rows[i] for i in pareto_front([(s.clean, s.robust) for s in rows])]


def robust_at_clean(front, clean, clean_error=False):
    """``(robust, se)`` of a front (:func:`method_front`) at clean accuracy ``clean``: linear
    interpolation between the two neighbouring points, ``robust = (1 - w) r0 + w r1`` with
    ``w = (clean - c0) / (c1 - c0)`` and ``se^2 = (1 - w)^2 se0^2 + w^2 se1^2`` (independent runs).
    With ``clean_error``, the points' clean accuracies are uncertain too: moving the segment
    sideways moves the reading by its slope ``s = (r1 - r0) / (c1 - c0)``, which adds
    ``s^2 ((1 - w)^2 cse0^2 + w^2 cse1^2)`` to ``se^2`` (``cse``: the points' clean standard errors).
    Outside the front's clean range the front says nothing: ``(nan, nan)``."""
    _check_accuracy(clean, "clean")
    if not front:
        raise ValueError("robust_at_clean: the front is empty")
    for a, b in zip(front, front[1:]):
        if b.clean <= a.clean:
            raise ValueError("robust_at_clean: the front must be sorted by strictly increasing clean accuracy "
                             "(use method_front)")
    for a, b in zip(front, front[1:]):
        if a.clean <= clean <= b.clean:
            w = (clean - a.clean) / (b.clean - a.clean)
            var = (1 - w) ** 2 * a.robust_se ** 2 + w ** 2 * b.robust_se ** 2
            if clean_error:
                slope = (b.robust - a.robust) / (b.clean - a.clean)
                var += slope ** 2 * ((1 - w) ** 2 * a.clean_se ** 2 + w ** 2 * b.clean_se ** 2)
            return (1 - w) * a.robust + w * b.robust, math.sqrt(var)
    if front[0].clean == clean:  # a one-point front: no slope to read
        return front[0].robust, front[0].robust_se
    return math.nan, math.nan


@dataclasses.dataclass(frozen=True)
class Comparison:
    """``method`` against ``other`` at clean accuracy ``clean``: robust accuracies read off their
    fronts, their difference and its standard error."""

    method: str
    other: str
    clean: float
    robust: float
    other_robust: float
    diff: float
    se: float


def compare(summaries, method, others=None, clean_error=True):
    """``method`` against each of ``others`` (default: every other method) at equal clean accuracy.

    The clean levels compared are the clean accuracies of both fronts' points that lie where the
    two fronts overlap; each side's robust accuracy there is :func:`robust_at_clean`, whose standard
    error counts the uncertain clean accuracies too when ``clean_error`` (the default). The two
    sides' errors add as independent, which overstates the noise of a difference measured on the
    same test images. A pair of methods whose fronts do not overlap gives no rows."""
    mine = method_front(summaries, method)
    others = sorted({s.method for s in summaries} - {method}) if others is None else list(others)
    rows = []
    for other in others:
        theirs = method_front(summaries, other)
        low, high = max(mine[0].clean, theirs[0].clean), min(mine[-1].clean, theirs[-1].clean)
        for clean in sorted({s.clean for s in mine + theirs if low <= s.clean <= high}):
            r, se = robust_at_clean(mine, clean, clean_error)
            r2, se2 = robust_at_clean(theirs, clean, clean_error)
            rows.append(Comparison(method, other, clean, r, r2, r - r2, math.hypot(se, se2)))
    return rows


def _pct(value, se=None):
    return f"{100 * value:.1f}" if se is None else f"{100 * value:.1f} ± {100 * Z95 * se:.1f}"


def points_table(summaries, attack):
    """Markdown: one row per (method, knob value), accuracies in % with 95% intervals, and whether
    the point is on its method's front."""
    on_front = {id(s) for m in {s.method for s in summaries} for s in method_front(summaries, m)}
    lines = [f"| method | knob | seeds | clean | {attack} | on front |", "|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s.method} | {s.label} | {','.join(map(str, s.seeds))} | {_pct(s.clean, s.clean_se)} "
                     f"| {_pct(s.robust, s.robust_se)} | {'yes' if id(s) in on_front else 'no'} |")
    return "\n".join(lines)


def comparison_table(rows, attack):
    """Markdown: one row per :class:`Comparison`, accuracies in %, the difference with its 95% interval."""
    lines = [f"| clean | {rows[0].method if rows else 'method'} {attack} | vs | their {attack} | difference (95% CI) |",
             "|---|---|---|---|---|"]
    for c in rows:
        lines.append(f"| {_pct(c.clean)} | {_pct(c.robust)} | {c.other} | {_pct(c.other_robust)} | "
                     f"{100 * c.diff:+.1f} ± {100 * Z95 * c.se:.1f} |")
    return "\n".join(lines)

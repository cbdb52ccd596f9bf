"""Accuracy: the one tally of correct predictions, clean and robust accuracy over a data set, the
robustness table of several models, the worst case over several attacks, and the checks for
gradient masking."""
import math
import warnings

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .attacks import NORMS, PIXELS, make_attack, require_torchattacks
from .capture import eval_mode
from .env import model_device
from .outputs import logits_of


def hits(logits, y):
    """Which predictions are right: the top logit names the label."""
    return logits.argmax(1) == y


def accuracy(logits, y):
    """The batch's accuracy as a detached scalar tensor."""
    return hits(logits, y).float().mean().detach()


def evaluate(model, loader, attacks=None, device=None, progress=False, distributed=False, logits=None, per_sample=False):
    """Clean accuracy and the accuracy under each attack (name -> attack, each run on its own);
    ``logits`` says where the model's output holds the logits (:mod:`neurosens.outputs`).

    Returns ``{"n": images, "clean": acc, name: acc, ...}``; with ``distributed``, counts are summed
    over the ranks (each giving its own shard). ``per_sample`` adds ``"hits"``: ``{name: [n] bool}``,
    which samples were right, in the loader's order (not with ``distributed``)."""
    if per_sample and distributed:
        raise ValueError("evaluate: per_sample=True keeps each rank's own samples; it cannot be combined with distributed=True")
    attacks = attacks or {}
    device = device or model_device(model)
    names = ["clean", *attacks]
    right = {name: [] for name in names}
    with eval_mode(model):
        for x, y in tqdm(loader, desc=f"eval {', '.join(names)}", unit="batch", disable=not progress, leave=False):
            x, y = x.to(device), y.to(device)
            for name in names:
                inputs = x if name == "clean" else attacks[name](x, y)
                with torch.no_grad():
                    right[name].append(hits(logits_of(model(inputs), logits, "evaluate"), y).cpu())
    right = {name: torch.cat(batches) if batches else torch.zeros(0, dtype=torch.bool) for name, batches in right.items()}
    counts = torch.tensor([float(right[name].sum()) for name in names] + [float(len(right["clean"]))], dtype=torch.float64)
    if distributed:
        dist.all_reduce(counts)
    total = int(counts[-1])
    result = {"n": total, **{name: (counts[i] / max(total, 1)).item() for i, name in enumerate(names)}}
    if per_sample:
        result["hits"] = right
    return result


def survived_all(hits_by_name):
    """The fraction of samples right under every entry of ``{name: [n] bool}`` (a per-sample AND)."""
    stacked = torch.stack(list(hits_by_name.values()))
    return stacked.all(0).sum().item() / max(stacked.shape[1], 1)


def worst_case_attacks(model, eps, norm="linf", steps=40, alpha=None, num_classes=10, seed=0, logits=None,
                       autoattack=None, **neuron):
    """The attacks of the worst-case evaluation: PGD-``steps``, AutoAttack (``autoattack=None``:
    when torchattacks is installed) and the neuron-targeted PGD-``steps`` (``neuron``: its
    ``layers``, ``k``, ``weight``, ``metric``)."""
    attacks = {f"pgd-{steps}": make_attack("pgd", model, eps, norm, alpha, steps, logits=logits)}
    if autoattack is None:
        try:
            require_torchattacks()
            autoattack = True
        except ImportError:
            autoattack = False
    if autoattack:
        attacks["autoattack"] = make_attack("autoattack", model, eps, norm, num_classes=num_classes, seed=seed, logits=logits)
    attacks[f"neuron-pgd-{steps}"] = make_attack("neuron-pgd", model, eps, norm, alpha, steps, logits=logits, **neuron)
    return attacks


def worst_case(model, loader, attacks, device=None, progress=False, logits=None):
    """:func:`evaluate` under ``attacks`` plus ``"worst"``: the fraction of samples right on the
    clean input and under every attack, the per-sample minimum over the attacks."""
    result = evaluate(model, loader, attacks, device, progress, logits=logits, per_sample=True)
    result["worst"] = survived_all(result["hits"])
    return result


def robustness(models, loader, eps, steps=20, progress=True, logits=None):
    """``{label: {"n", "clean", "fgsm", "pgd-<steps>", "cw"}}`` accuracies of ``{label: model}`` on ``loader``."""
    table = {}
    for label, model in models.items():
        attacks = {"fgsm": make_attack("fgsm", model, eps, logits=logits),
                   f"pgd-{steps}": make_attack("pgd", model, eps, steps=steps, logits=logits),
                   "cw": make_attack("cw", model, eps, steps=steps, logits=logits)}
        table[label] = evaluate(model, loader, attacks, progress=progress, logits=logits)
    return table


#: The gradient-masking checks :func:`masking_checks` runs, and what each one asks.
MASKING_CHECKS = {
    "black_box": "the white-box PGD is at least as strong as the black-box Square attack",
    "eps_curve": "PGD accuracy falls to (about) 0 as eps grows to the whole input range",
    "steps": "more PGD steps never help the model (accuracy non-increasing in steps)",
}


def full_range_eps(norm, input_size):
    """The eps at which a ``norm`` ball around any [0, 1] input of ``input_size`` elements holds
    every input: the range's width for L-inf, width * sqrt(size) for L2."""
    width = PIXELS[1] - PIXELS[0]
    return width if norm == "linf" else width * math.sqrt(input_size)


def default_eps_grid(eps, full):
    """eps/2, eps, then doubling up to ``full`` (:func:`full_range_eps`), which is included."""
    grid = [eps / 2]
    while grid[-1] * 2 < full:
        grid.append(grid[-1] * 2)
    return grid + [full]


def check_masking_options(eps, steps, eps_grid, queries, tol, full=None):
    """The options of :func:`masking_checks`, checked before any attack runs; ``full`` is
    :func:`full_range_eps`, and the eps grid is checked only when it is given (the grid's top
    depends on the size of the inputs). Returns the steps and the eps grid (None without ``full``)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"masking checks: eps={eps!r} must be a finite number > 0")
    steps = list(steps)
    if len(steps) < 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps) or steps != sorted(set(steps)):
        raise ValueError(f"masking checks: steps={steps!r} must be at least two increasing integers >= 1, e.g. (10, 20, 40)")
    if isinstance(queries, bool) or not isinstance(queries, int) or queries < 1:
        raise ValueError(f"masking checks: queries={queries!r} must be an integer >= 1")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 1:
        raise ValueError(f"masking checks: tol={tol!r} must be a number in [0, 1)")
    if full is None:
        return steps, None
    if eps_grid is None and eps >= full:
        raise ValueError(f"masking checks: eps={eps:g} already spans the whole input range (the ball of radius "
                         f"{full:g} holds every input), so the eps curve has nothing to climb")
    grid = default_eps_grid(eps, full) if eps_grid is None else list(eps_grid)
    if (len(grid) < 2 or any(isinstance(e, bool) or not isinstance(e, (int, float)) or not e > 0 for e in grid)
            or grid != sorted(set(grid))):
        raise ValueError(f"masking checks: eps_grid={eps_grid!r} must be at least two increasing numbers > 0")
    if grid[-1] < full:
        raise ValueError(f"masking checks: eps_grid={eps_grid!r} must reach {full:g}, where the eps-ball holds every "
                         "input of the range [0, 1] and accuracy must fall to 0")
    return steps, grid


def masking_checks(model, loader, eps, norm="linf", steps=(10, 20, 40), eps_grid=None, queries=1000, tol=0.01, seed=0,
                   device=None, progress=False, logits=None):
    """Run the gradient-masking checks of :data:`MASKING_CHECKS` and return a verdict per check.

    * ``black_box``: Square (``queries``, torchattacks) against the strongest PGD of ``steps``
      at ``eps``; it passes when PGD's accuracy is at most Square's + ``tol``.
    * ``eps_curve``: PGD-``max(steps)`` at every eps of ``eps_grid`` (default eps/2, eps, doubling,
      up to the eps whose ball holds every input: 1 for L-inf, sqrt(input size) for L2); it passes
      when the accuracy at the largest eps is at most ``tol``.
    * ``steps``: PGD at ``eps`` with each number of ``steps``; it passes when no longer run is
      more than ``tol`` above a shorter one.

    Every attack starts from the RNG seeded with ``seed``. Returns ``{check: {"passed", ...numbers},
    "passed": all passed}``.
    """
    if norm not in NORMS:
        raise ValueError(f"masking checks: norm={norm!r} is unknown; expected one of {', '.join(NORMS)}")
    full = full_range_eps(norm, next(iter(loader))[0][0].numel())
    steps, grid = check_masking_options(eps, steps, eps_grid, queries, tol, full)
    require_torchattacks("the black-box check (Square)")
    device = device or model_device(model)

    def robust(name, budget, **options):
        with warnings.catch_warnings():
            # The largest eps of the curve spans the whole input range on purpose.
            warnings.filterwarnings("ignore", message=".*spans the whole input range.*")
            attack = make_attack(name, model, budget, norm, seed=seed, logits=logits, **options)
        torch.manual_seed(seed)
        return evaluate(model, loader, {name: attack}, device, progress, logits=logits)[name]

    by_steps = [robust("pgd", eps, steps=s) for s in steps]
    square = robust("square", eps, queries=queries)
    curve = [by_steps[-1] if e == eps else robust("pgd", e, steps=steps[-1]) for e in grid]
    white = min(by_steps)
    report = {
        "black_box": {"passed": white <= square + tol, "white_box": white, "square": square, "queries": queries},
        "eps_curve": {"passed": curve[-1] <= tol, "eps": grid, "accuracy": curve, "steps": steps[-1]},
        "steps": {"passed": all(later <= earlier + tol for i, earlier in enumerate(by_steps) for later in by_steps[i + 1:]),
                  "steps": steps, "accuracy": by_steps},
    }
    report["passed"] = all(check["passed"] for check in report.values())
    report["tol"] = tol
    return report

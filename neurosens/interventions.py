"""Interventions that show sensitive neurons matter.

For one layer and a set of its neurons, the model runs in eval mode on the concatenated batch
``[x; x_adv]`` while a forward hook edits those neurons' outputs:

* ``"zero"``: set them to 0 on both halves;
* ``"repair"``: give the adversarial half the benign output of the same input;
* ``"mean"``: set them to their mean benign output (a per-neuron map averaged over the data).

A model whose output is not the logits tensor itself takes ``logits=`` (a key, an index or a
callable; :mod:`neurosens.outputs`). :func:`intervention_curve` reports benign and adversarial accuracy as the number of edited
neurons grows, for the most sensitive, random (averaged over seeds) or least sensitive neurons.
"""
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from .capture import check_batch_rows, eval_mode, forward_rows, output_tensor
from .layers import NeuronDims, check_eager, eager, select_layers
from .checks import check_index_range
from .env import model_device
from .evaluation import hits
from .outputs import logits_of
from .selection import resolve_k

MODES = ("zero", "repair", "mean")
SELECTIONS = ("top", "random", "bottom")


def _single_layer(model, layer, channel_dim=None):
    """``(name, module, neuron dims)`` of the one layer ``layer`` selects."""
    modules = select_layers(model, layer)
    if len(modules) != 1:
        raise ValueError(f"layer={layer!r} selects {len(modules)} layers ({', '.join(modules)}); interventions take one")
    name, module = next(iter(modules.items()))
    return name, module, NeuronDims(model, modules, channel_dim, f"layer {name!r}")


@contextmanager
def intervene(model, layer, neurons, mode="repair", channel_dim=None, mean=None, output_index=None):
    """Edit ``neurons`` of ``layer`` while the model runs on ``[x; x_adv]`` batches (see module doc).

    The layer's neuron dim is inferred as in measurement, or given by ``channel_dim`` (see
    :class:`~neurosens.layers.NeuronDims`). ``mean`` is the layer's mean benign output without
    the batch dim, needed by ``mode="mean"`` (:func:`mean_benign_output` computes it).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown; expected one of {', '.join(MODES)}")
    if mode == "mean" and mean is None:
        raise ValueError("mode='mean' needs the layer's mean benign output: pass mean=mean_benign_output(...)")
    check_eager(model, "intervene")
    name, module, neuron_dims = _single_layer(model, layer, channel_dim)
    neurons = torch.as_tensor(neurons, dtype=torch.long).flatten()
    rows = []  # the batch size of the model's latest forward

    def note_rows(mod, args, kwargs):
        rows[:] = [forward_rows(args, kwargs)]

    def edit(mod, inputs, output):
        out = output_tensor(name, output, output_index)
        check_batch_rows(name, out, rows[0] if rows else None, "the batch of the model's forward")
        cdim = neuron_dims(name, out)
        check_index_range(neurons, out.shape[cdim], f"layer {name!r}", "neurons")
        if neurons.numel() == 0:
            return None
        if mode == "repair" and out.shape[0] % 2:
            raise ValueError(f"layer {name!r}: 'repair' needs a [x; x_adv] batch of even size, got {out.shape[0]}")
        out = out.movedim(cdim, 1).clone()
        idx = neurons.to(out.device)
        if mode == "zero":
            out[:, idx] = 0
        elif mode == "repair":
            half = out.shape[0] // 2
            out[half:, idx] = out[:half, idx]
        else:
            out[:, idx] = mean.to(out.device, out.dtype).movedim(cdim - 1, 0)[idx]
        out = out.movedim(1, cdim)
        if output_index is None:
            return out
        edited = list(output) if not isinstance(output, dict) else dict(output)
        edited[output_index] = out
        return type(output)(edited) if isinstance(output, tuple) else edited

    handles = [model.register_forward_pre_hook(note_rows, with_kwargs=True), module.register_forward_hook(edit)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def adversarial_batches(model, loader, attack, device=None, max_batches=None, progress=True):
    """``[(x, x_adv, y)]`` on ``device``: the attack runs once and every intervention reuses it."""
    device = device or model_device(model)
    batches = []
    for i, (x, y) in enumerate(tqdm(loader, desc="attack", unit="batch", disable=not progress)):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device), y.to(device)
        batches.append((x, attack(x, y), y))
    return batches


@torch.no_grad()
def mean_benign_output(model, batches, layer, output_index=None):
    """The mean over samples of ``layer``'s benign output: a [C, ...] map."""
    model = eager(model)  # hooks fire only in eager code
    name, module, _ = _single_layer(model, layer)
    total, count, rows = None, 0, None

    def keep(mod, inputs, output):
        nonlocal total, count
        out = output_tensor(name, output, output_index).double()
        check_batch_rows(name, out, rows, "the benign batch")
        total = out.sum(0) if total is None else total + out.sum(0)
        count += out.shape[0]

    handle = module.register_forward_hook(keep)
    try:
        with eval_mode(model):
            for x, _, _ in batches:
                rows = x.shape[0]
                model(x)
    finally:
        handle.remove()
    return (total / count).float()


@torch.no_grad()
def accuracies(model, batches, layer=None, neurons=(), mode="repair", channel_dim=None, mean=None, output_index=None,
               logits=None):
    """(benign accuracy, adversarial accuracy) over ``batches`` with the intervention applied."""
    correct_benign = correct_adv = total = 0
    model = eager(model)  # hooks fire only in eager code
    with eval_mode(model):
        for x, x_adv, y in batches:
            if layer is None:
                out = model(torch.cat([x, x_adv]))
            else:
                with intervene(model, layer, neurons, mode, channel_dim, mean, output_index):
                    out = model(torch.cat([x, x_adv]))
            right = hits(logits_of(out, logits, "interventions"), y.repeat(2))
            correct_benign += right[: len(y)].sum().item()
            correct_adv += right[len(y):].sum().item()
            total += len(y)
    return correct_benign / total, correct_adv / total


def intervention_curve(model, batches, layer, report, ks=(0.01, 0.02, 0.05, 0.1, 0.2), selection="top", mode="repair",
                       seeds=3, channel_dim=None, output_index=None, progress=True, logits=None):
    """Benign and adversarial accuracy as ``k`` neurons of ``layer`` are edited.

    ``batches`` come from :func:`adversarial_batches`; ``report`` is the layer's
    :class:`~neurosens.report.SensitivityReport` that ranks the neurons; ``ks`` are counts or
    fractions. Random selections are averaged over ``seeds`` draws (their spread is reported).
    Returns a dict with ``k`` (counts), ``benign``, ``adversarial`` and, for random, ``*_std``,
    plus the unedited ``baseline``.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection={selection!r} is unknown; expected one of {', '.join(SELECTIONS)}")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown; expected one of {', '.join(MODES)}")
    name, _, _ = _single_layer(model, layer, channel_dim)
    num = report[name].numel()
    counts = [resolve_k(k, num, f"intervention_curve(layer={name!r})", what="ks entry") for k in ks]
    mean = mean_benign_output(model, batches, name, output_index) if mode == "mean" else None
    draws = seeds if selection == "random" else 1
    result = {"layer": name, "selection": selection, "mode": mode, "k": counts, "benign": [], "adversarial": [],
              "baseline": accuracies(model, batches, logits=logits)}
    if selection == "random":
        result["benign_std"], result["adversarial_std"] = [], []
    for k in tqdm(counts, desc=f"{mode} {selection} {name}", unit="k", disable=not progress):
        runs = []
        for seed in range(draws):
            if selection == "random":
                neurons = torch.randperm(num, generator=torch.Generator().manual_seed(seed))[:k]
            else:
                neurons = report.topk(name, k, largest=selection == "top").indices
            runs.append(accuracies(model, batches, name, neurons, mode, channel_dim, mean, output_index, logits))
        runs = torch.tensor(runs, dtype=torch.float64)
        result["benign"].append(runs[:, 0].mean().item())
        result["adversarial"].append(runs[:, 1].mean().item())
        if selection == "random":
            result["benign_std"].append(runs[:, 0].std(unbiased=False).item())
            result["adversarial_std"].append(runs[:, 1].std(unbiased=False).item())
    return result

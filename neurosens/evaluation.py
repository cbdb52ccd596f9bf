"""Accuracy: the one tally of correct predictions, clean and robust accuracy over a data set, and
the robustness table of several models."""
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .attacks import make_attack
from .capture import eval_mode
from .env import model_device
from .outputs import logits_of


def hits(logits, y):
    """Which predictions are right: the top logit names the label."""
    return logits.argmax(1) == y


def accuracy(logits, y):
    """The batch's accuracy as a detached scalar tensor."""
    return hits(logits, y).float().mean().detach()


def evaluate(model, loader, attacks=None, device=None, progress=False, distributed=False, logits=None):
    """Clean accuracy and the accuracy under each attack (name -> attack, each run on its own);
    ``logits`` says where the model's output holds the logits (:mod:`neurosens.outputs`).

    Returns ``{"n": images, "clean": acc, name: acc, ...}``; with ``distributed``, counts are summed
    over the ranks (each giving its own shard)."""
    attacks = attacks or {}
    device = device or model_device(model)
    names = ["clean", *attacks]
    correct = torch.zeros(len(names), dtype=torch.float64)
    total = 0
    with eval_mode(model):
        for x, y in tqdm(loader, desc="eval", unit="batch", disable=not progress, leave=False):
            x, y = x.to(device), y.to(device)
            for i, name in enumerate(names):
                inputs = x if name == "clean" else attacks[name](x, y)
                with torch.no_grad():
                    correct[i] += hits(logits_of(model(inputs), logits, "evaluate"), y).sum().item()
            total += len(y)
    counts = torch.cat([correct, torch.tensor([float(total)], dtype=torch.float64)])
    if distributed:
        dist.all_reduce(counts)
    total = int(counts[-1])
    return {"n": total, **{name: (counts[i] / max(total, 1)).item() for i, name in enumerate(names)}}


def robustness(models, loader, eps, steps=20, progress=True, logits=None):
    """``{label: {"n", "clean", "fgsm", "pgd-<steps>", "cw"}}`` accuracies of ``{label: model}`` on ``loader``."""
    table = {}
    for label, model in models.items():
        attacks = {"fgsm": make_attack("fgsm", model, eps, logits=logits),
                   f"pgd-{steps}": make_attack("pgd", model, eps, steps=steps, logits=logits),
                   "cw": make_attack("cw", model, eps, steps=steps, logits=logits)}
        table[label] = evaluate(model, loader, attacks, progress=progress, logits=logits)
    return table

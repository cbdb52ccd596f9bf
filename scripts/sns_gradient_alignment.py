"""How the SNS term's weight gradient changes when the benign side is detached.

For each model, on one training batch and its PGD-5 twin, the stabilizing term (all conv/linear
layers, top-k per layer) is differentiated with respect to the weights twice: through both sides
(the true gradient) and with the benign activations detached. The cosine between the two tells
whether the detached gradient still descends the term: a negative cosine means a step along it
increases the benign-adversarial distance it is meant to shrink.

    python scripts/sns_gradient_alignment.py runs/mnist-{standard,pgd_at,sns}-s0/model.pt
"""
import argparse

import torch
import torch.nn.functional as F

import neurosens as ns
from neurosens.checkpoint import load_model
from neurosens.data import make_loader, mnist


def flat_grad(loss, params):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def term_gradient(model, x, x_adv, params, detach_benign, args):
    reg = ns.SNSRegularizer(model, layers="auto", k=args.k, lam=1.0, metric=args.metric, detach_benign=detach_benign)
    with reg.capture():
        model(x)
        model(x_adv)
    return flat_grad(reg.loss(), params)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="checkpoints of MNIST models")
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--k", type=float, default=0.1)
    parser.add_argument("--metric", default="l1", choices=["l1", "l2", "cosine"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--data-root", default="data")
    args = parser.parse_args()

    torch.manual_seed(0)
    x, y = next(iter(make_loader(mnist(train=True, root=args.data_root), batch_size=args.batch)))
    print("| model | true gradient norm | detached gradient norm | cosine(true, detached) |")
    print("|---|---:|---:|---:|")
    for path in args.models:
        model = load_model(path).train()
        params = list(model.parameters())
        torch.manual_seed(1)  # the same random start whatever the order of the models
        x_adv = ns.PGD(model, eps=args.eps, alpha=args.eps / 3, steps=5)(x, y)
        true = term_gradient(model, x, x_adv, params, False, args)
        detached = term_gradient(model, x, x_adv, params, True, args)
        print(f"| {path} | {true.norm():.3f} | {detached.norm():.3f} | {F.cosine_similarity(true, detached, 0):.2f} |")


if __name__ == "__main__":
    main()

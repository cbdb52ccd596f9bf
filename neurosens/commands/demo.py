"""The end-to-end job on the embedded digits data: train, attack, measure, rank."""
import time

HELP = "Train a small CNN on scikit-learn's digits, attack it with PGD, and print its most sensitive neurons."


def add_arguments(parser):
    parser.add_argument("--epochs", type=int, default=15, help="training epochs (default: 15)")
    parser.add_argument("--eps", type=float, default=0.1, help="L-inf budget of the PGD attack in pixel units (default: 0.1)")
    parser.add_argument("--steps", type=int, default=20, help="PGD steps (default: 20)")
    parser.add_argument("--top", type=int, default=10, help="neurons to list per layer (default: 10)")
    parser.add_argument("--seed", type=int, default=0)


def run(args):
    import torch
    from sklearn.datasets import load_digits
    from torch import nn
    from tqdm.auto import tqdm

    from ..ops import info, neuron_distance

    torch.manual_seed(args.seed)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixels in [0, 1]
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y))
    train, test = order[:1500], order[1500:]

    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(1, 32, 3, padding=1))
    model.add_module("relu1", nn.ReLU())
    model.add_module("conv2", nn.Conv2d(32, 64, 3, padding=1))
    model.add_module("relu2", nn.ReLU())
    model.add_module("pool", nn.MaxPool2d(2))
    model.add_module("flatten", nn.Flatten())
    model.add_module("fc1", nn.Linear(64 * 16, 128))
    model.add_module("relu3", nn.ReLU())
    model.add_module("fc2", nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    started = time.perf_counter()
    for _ in tqdm(range(args.epochs), desc="train", unit="epoch"):
        model.train()
        for batch in train[torch.randperm(len(train))].split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
    model.eval()

    def pgd(xb, yb):
        alpha = 2.5 * args.eps / args.steps
        adv = (xb + torch.empty_like(xb).uniform_(-args.eps, args.eps)).clamp(0, 1)
        for _ in range(args.steps):
            adv.requires_grad_(True)
            grad, = torch.autograd.grad(nn.functional.cross_entropy(model(adv), yb), adv)
            adv = (xb + (adv.detach() + alpha * grad.sign() - xb).clamp(-args.eps, args.eps)).clamp(0, 1)
        return adv.detach()

    xt, yt = x[test], y[test]
    xa = pgd(xt, yt)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    sums = {}

    def hook(name):
        def reduce(module, inputs, output):
            benign, adversarial = output.chunk(2)
            sums[name] = neuron_distance(benign, adversarial)
        return reduce

    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
    try:
        with torch.no_grad():
            logits = model(torch.cat([xt, xa]))
    finally:
        for h in handles:
            h.remove()
    clean_acc = (logits[: len(yt)].argmax(1) == yt).float().mean().item()
    adv_acc = (logits[len(yt):].argmax(1) == yt).float().mean().item()

    print(f"\nkernels: {info()['cpu kernels']}; {len(train)} training and {len(test)} test digits, "
          f"{time.perf_counter() - started:.1f} s")
    print(f"accuracy: clean {clean_acc:.1%}, PGD-{args.steps} (eps {args.eps}) {adv_acc:.1%}\n")
    for name, d in sums.items():
        sensitivity = d.sum / d.count
        k = min(args.top, sensitivity.numel())
        values, indices = sensitivity.topk(k)
        ranked = ", ".join(f"{i}:{v:.3f}" for i, v in zip(indices.tolist(), values.tolist()))
        print(f"{name:6s} mean {sensitivity.mean():.4f}  top {k}: {ranked}")
    return 0

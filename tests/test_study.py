"""The side-by-side study: its numbers against direct computation, and the page it writes."""
import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from neurosens.attacks import CW, PGD
from neurosens.data import make_loader
from neurosens.study import run_study
from tqdm.auto import tqdm


def net(seed):
    """No biases and tripled weights: default-initialized, this net predicts one class whatever its
    input, so no attack or intervention would change its accuracy."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3)).eval()
    with torch.no_grad():
        for i in (1, 3, 5):
            model[i].bias.zero_()
            model[i].weight.mul_(3)
    return model


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 4, 4, generator=gen)
    y = torch.randint(0, 3, (40,), generator=gen)
    models = {"a": net(1), "b": net(2)}
    out = tmp_path_factory.mktemp("study")
    torch.manual_seed(0)  # the attacks' random starts, replayed by test_numbers_match_a_replay_computed_by_hand
    summary = run_study(models, TensorDataset(x, y), 0.1, out, ks=(0.1, 0.5), seeds=2, steps=3, batch_size=16,
                        progress=False)
    return models, x, y, out, summary


@pytest.mark.slow
def test_clean_accuracy_and_layer_means_match_direct_computation(study):
    models, x, y, _, summary = study
    for label, model in models.items():
        with torch.no_grad():
            clean = (model(x).argmax(1) == y).double().mean().item()
        assert summary["robustness"][label]["clean"] == pytest.approx(clean)
        assert summary["robustness"][label]["n"] == 40
        for name in ("fgsm", "pgd-3", "cw"):
            assert 0 <= summary["robustness"][label][name] <= clean + 1e-12
    assert set(summary["layer_means"]["a"]) == {"1", "3", "5"}


@pytest.mark.slow
def test_interventions_run_on_the_layer_before_the_output(study):
    _, _, _, _, summary = study
    inter = summary["interventions"]
    assert inter["model"] == "a" and inter["layer"] == "3"
    curves = inter["curves"]
    assert set(curves) == {"repair", "zero"} and set(curves["repair"]) == {"top", "random", "bottom"}
    assert curves["repair"]["top"]["k"] == [1, 5] and curves["repair"]["top"]["neurons"] == 10
    # Repairing never changes benign inputs: the benign accuracy is the clean accuracy.
    assert curves["repair"]["top"]["benign"] == [pytest.approx(summary["robustness"]["a"]["clean"])] * 2
    assert inter["at_10_percent"]["repair/top"]["k"] == 1


@pytest.mark.slow
def test_writes_a_self_contained_page_and_the_json(study):
    _, _, _, out, summary = study
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    assert "src=\"http" not in page and "<script" not in page
    clean = f"{100 * summary['robustness']['b']['clean']:.1f}%"
    assert clean in page
    assert json.loads((out / "results.json").read_text())["robustness"] == summary["robustness"]
    for name in ("a.report.json", "b.report.json", "layer_means.png", "interventions.png"):
        assert (out / name).is_file()


def test_report_command_reads_checkpoints_and_names_bad_labels(tmp_path, capsys):
    from neurosens.cli import main as cli_main
    from neurosens.models import build_model

    spec = {"name": "small-cnn", "num_classes": 10, "in_channels": 1, "input_size": 8, "width": 4}
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = tmp_path / f"m{seed}.pt"
        torch.save({"model": build_model(**spec).state_dict(), "meta": {"model": spec, "data": "digits8"}}, path)
        paths.append(str(path))
    out = tmp_path / "report"
    assert cli_main(["report", *paths, "--labels", "one", "two", "--out", str(out), "--eps", "0.1",
                     "-n", "40", "--steps", "2", "--seeds", "1"]) == 0
    assert "report:" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert list(results["robustness"]) == ["one", "two"] and results["test_images"] == 40
    with pytest.raises(SystemExit, match="1 labels for 2 models"):
        cli_main(["report", *paths, "--labels", "one", "--out", str(out), "--eps", "0.1"])
    with pytest.raises(SystemExit, match="--intervene-on: 'three'"):
        cli_main(["report", *paths, "--labels", "one", "two", "--intervene-on", "three",
                  "--out", str(out), "--eps", "0.1"])


def hand_fgsm(model, x, y, eps):
    x = x.clone().requires_grad_(True)
    logits = model(x)
    loss = -(logits - logits.logsumexp(1, keepdim=True)).gather(1, y[:, None]).sum()
    grad, = torch.autograd.grad(loss, x)
    return (x + eps * grad.sign()).clamp(0, 1).detach()


def hand_curve(model, x, x_adv, y, layer, neurons, mode):
    """(benign, adversarial) accuracy with ``neurons`` of ``layer`` (an index into the Sequential)
    zeroed on both inputs or, for repair, given their benign value on the adversarial input."""
    with torch.no_grad():
        benign, adversarial = model[: layer + 1](x), model[: layer + 1](x_adv)
        if mode == "zero":
            benign[:, neurons] = 0
            adversarial[:, neurons] = 0
        else:
            adversarial[:, neurons] = benign[:, neurons]
        head = model[layer + 1:]
        return [(head(h).argmax(1) == y).double().mean().item() for h in (benign, adversarial)]


def test_numbers_match_a_replay_computed_by_hand(study):
    """Replays the study's attacks in its order (the same random starts) and computes every
    accuracy, sensitivity and intervention from the adversarial inputs by hand."""
    models, x, y, _, summary = study
    eps = 0.1
    # The study's loader, iterated afresh through a (disabled) progress bar for each pass as the
    # study does: both draw from the global RNG when they start, so the replay must do the same.
    loader = make_loader(TensorDataset(x, y), 16)

    def batches():
        return tqdm(loader, disable=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for label, model in models.items():
            hits = torch.zeros(3)
            for xb, yb in batches():
                for i, x_adv in enumerate((hand_fgsm(model, xb, yb, eps), PGD(model, eps, steps=3)(xb, yb),
                                           CW(model, eps, steps=3)(xb, yb))):
                    with torch.no_grad():
                        hits[i] += (model(x_adv).argmax(1) == yb).sum()
            got = summary["robustness"][label]
            assert [got["fgsm"], got["pgd-3"], got["cw"]] == pytest.approx((hits / 40).tolist()), label
        sensitivity = {}
        for label, model in models.items():
            x_adv = torch.cat([PGD(model, eps, steps=3)(xb, yb) for xb, yb in batches()])
            with torch.no_grad():
                # Mean over samples of |a - b| per unit: every measured layer is a Linear.
                sensitivity[label] = {str(i): (model[: i + 1](x) - model[: i + 1](x_adv)).abs().mean(0) for i in (1, 3, 5)}
            means = {name: v.mean().item() for name, v in sensitivity[label].items()}
            assert summary["layer_means"][label] == pytest.approx(means, rel=1e-5), label
        model = models["a"]
        x_adv = torch.cat([PGD(model, eps, steps=3)(xb, yb) for xb, yb in batches()])
    order = sensitivity["a"]["3"].argsort(descending=True).tolist()
    picks = {"top": [order[:1], order[:5]], "bottom": [order[::-1][:1], order[::-1][:5]],
             "random": [[torch.randperm(10, generator=torch.Generator().manual_seed(s))[:k].tolist() for s in (0, 1)]
                        for k in (1, 5)]}
    curves = summary["interventions"]["curves"]
    assert all([c["top"]["benign"], c["top"]["adversarial"]] != [c["bottom"]["benign"], c["bottom"]["adversarial"]]
               for c in curves.values()), \
        "the test needs curves that tell the selections apart"
    for mode in ("repair", "zero"):
        for selection, per_k in picks.items():
            curve = summary["interventions"]["curves"][mode][selection]
            if selection == "random":
                expected = [torch.tensor([hand_curve(model, x, x_adv, y, 3, n, mode) for n in draws]).mean(0).tolist()
                            for draws in per_k]
            else:
                expected = [hand_curve(model, x, x_adv, y, 3, n, mode) for n in per_k]
            assert curve["benign"] == pytest.approx([e[0] for e in expected]), (mode, selection)
            assert curve["adversarial"] == pytest.approx([e[1] for e in expected]), (mode, selection)

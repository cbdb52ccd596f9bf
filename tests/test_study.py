"""The side-by-side study: its numbers against direct computation, and the page it writes."""
import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from neurosens.study import run_study


def net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3)).eval()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 4, 4, generator=gen)
    y = torch.randint(0, 3, (40,), generator=gen)
    models = {"a": net(1), "b": net(2)}
    out = tmp_path_factory.mktemp("study")
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
    assert cli_main(["report", "--models", *paths, "--labels", "one", "two", "--out", str(out), "--eps", "0.1",
                     "-n", "40", "--steps", "2", "--seeds", "1"]) == 0
    assert "report:" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert list(results["robustness"]) == ["one", "two"] and results["test_images"] == 40
    with pytest.raises(SystemExit, match="1 labels for 2 models"):
        cli_main(["report", "--models", *paths, "--labels", "one", "--out", str(out), "--eps", "0.1"])
    with pytest.raises(SystemExit, match="--intervene-on: 'three'"):
        cli_main(["report", "--models", *paths, "--labels", "one", "two", "--intervene-on", "three",
                  "--out", str(out), "--eps", "0.1"])

"""The command line speaks one dialect: every command takes its options the same way."""
import json

import pytest

from neurosens.checkpoint import save_checkpoint
from neurosens.cli import build_parser, main

from conftest import SPEC, fresh_model


COMMANDS = {"train": ["train", "--out", "o"], "demo": ["demo"], "eval": ["eval", "m.pt"],
            "sensitivity": ["sensitivity", "m.pt", "--out", "o"], "report": ["report", "m.pt", "--out", "o"]}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_reads_eps_as_a_fraction_and_names_the_data_root_alike(command):
    args = build_parser().parse_args(COMMANDS[command] + ["--eps", "8/255", "--root", "r"])
    assert args.eps == 8 / 255 and args.root == "r"


@pytest.mark.parametrize("command", ["eval", "sensitivity", "report"])
def test_the_sample_count_is_one_option(command):
    assert build_parser().parse_args(COMMANDS[command] + ["-n", "7"]).samples == 7
    assert build_parser().parse_args(COMMANDS[command] + ["--samples", "0"]).samples == 0


def test_layers_are_one_comma_list():
    from torch import nn

    args = build_parser().parse_args(["sensitivity", "m.pt", "--out", "o", "--layers", "conv*, nn.Linear"])
    assert args.layers == ["conv*", nn.Linear]
    assert build_parser().parse_args(["report", "m.pt", "--out", "o"]).layers == "auto"


@pytest.fixture()
def runs(tmp_path):
    def save(name, eps):
        path = tmp_path / name / "model.pt"
        path.parent.mkdir()
        save_checkpoint({"model": fresh_model().state_dict(), "meta": {"model": SPEC, "data": "digits8"},
                         "config": {} if eps is None else {"eps": eps}}, path)
        return str(path)

    return save


def test_eval_defaults_eps_to_the_training_eps(runs, tmp_path, capsys):
    model = runs("a", 0.05)
    out = tmp_path / "eval.json"
    assert main(["eval", model, "--attacks", "clean,fgsm", "-n", "20", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["eps"] == 0.05 and result["n"] == 20
    assert main(["eval", model, "--attacks", "fgsm", "-n", "20", "--eps", "0", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["results"]["fgsm"]["accuracy"] == result["results"]["clean"]["accuracy"]
    with pytest.raises(SystemExit, match="does not record a training eps; give --eps"):
        main(["eval", runs("bare", None), "--attacks", "clean"])


def test_report_defaults_eps_to_the_training_eps_the_models_share(runs, tmp_path):
    first, second, other = runs("a", 0.05), runs("b", 0.05), runs("c", 0.1)
    out = tmp_path / "rep"
    assert main(["report", first, second, "--out", str(out), "-n", "16", "--steps", "1", "--seeds", "1"]) == 0
    assert json.loads((out / "results.json").read_text())["eps"] == 0.05
    with pytest.raises(SystemExit, match=r"different eps \(.*a/model.pt: 0.05, .*c/model.pt: 0.1\); give --eps"):
        main(["report", first, other, "--out", str(out)])

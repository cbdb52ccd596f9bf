"""Every user error of the command line gives one line on stderr naming what is at fault and a
non-zero exit, before any expensive work, never a traceback."""
import pytest
import torch

from neurosens.checkpoint import save_checkpoint
from neurosens.report import SensitivityReport
from neurosens.cli import main

from conftest import CUDA, SPEC, fresh_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = root / "run" / "model.pt"
    model.parent.mkdir()
    save_checkpoint({"model": fresh_model().state_dict(), "meta": {"model": SPEC, "data": "digits8"},
                     "config": {"eps": 0.1}}, model)
    (root / "empty.pt").write_bytes(b"")
    (root / "corrupt.pt").write_bytes(b"PK\x03\x04" + bytes(range(256)))
    (root / "a-file").write_text("x")
    (root / "truncated.pt").write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    SensitivityReport({"conv1": torch.ones(8, dtype=torch.float64)}, {"metric": "l1", "eps": 0.1}).to_json(root / "l1.json")
    (root / "other.json").write_text('{"format": "something else"}')
    (root / "stale").mkdir()
    (root / "stale" / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (root / "no-data").mkdir()
    return root


def one_line_error(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code
    err = capsys.readouterr().err
    if isinstance(code, str):  # the interpreter prints it to stderr and exits with status 1
        err, code = err + code + "\n", 1
    lines = err.strip().splitlines()
    assert code not in (0, None), f"{argv} exited 0"
    assert len(lines) == 1, f"{argv}: stderr is not one line:\n{err}"
    assert "Traceback" not in err
    return lines[0]


def sub(files, argv):
    return [str(files / a[1:]) if a.startswith("@") else a for a in argv]


TRAIN = ["train", "--data", "digits8", "--width", "8", "--epochs", "1", "--no-progress", "--out", "@run-new"]
EVAL = ["eval", "@run/model.pt", "--eps", "0.1", "--attacks", "clean"]
SENS = ["sensitivity", "@run/model.pt", "--samples", "8", "--no-progress", "--out", "@sens"]
REPORT = ["report", "@run/model.pt", "--eps", "0.1", "--out", "@rep"]
DEMO = ["demo", "--out", "@demo"]

CASES = [
    # train
    (TRAIN + ["--eps", "-1"], "--eps"),
    (TRAIN + ["--eps", "inf"], "--eps"),
    (TRAIN + ["--steps", "0"], "--steps"),
    (TRAIN + ["--batch-size", "0"], "--batch-size"),
    (TRAIN + ["--sns-k", "0"], "--sns-k"),
    (TRAIN + ["--device", "foo"], "--device"),
    (TRAIN + ["--out", "@a-file"], "--out"),
    (TRAIN + ["--gamma", "-0.1"], "--gamma"),
    (TRAIN + ["--milestones", "0.5", "1.5"], "--milestones"),
    (TRAIN + ["--milestones", "0"], "--milestones"),
    (TRAIN + ["--train-limit", "-5"], "--train-limit"),
    (TRAIN + ["--train-limit", "0"], "--train-limit"),
    (TRAIN + ["--width", "0"], "--width"),
    (TRAIN + ["--threads", "0"], "--threads"),
    (TRAIN + ["--lr", "nan"], "--lr"),
    (["train", "--data", "mnist", "--root", "@no-data", "--out", "@run-new"], "mnist"),
    (TRAIN + ["--out", ""], "--out"),
    (TRAIN + ["--out", "@run"], "holds a run already (model.pt); --resume continues it, --overwrite starts it over"),
    (TRAIN + ["--out", "@run", "--resume", "--overwrite"], "give one"),
    (TRAIN + ["--out", "@stale"], "holds a run already (metrics.jsonl)"),
    (TRAIN + ["--momentum", "1"], "momentum=1.0: must be below 1"),
    (TRAIN + ["--method", "pgd_at", "--beta", "3"], "beta=3.0 is an option of method='trades', but this run's method is 'pgd_at'"),
    (TRAIN + ["--method", "trades", "--sns-k", "0.5"], "sns_k=0.5 is an option of method='sns'"),
    (TRAIN + ["--eps-warmup", "5"], "eps_warmup=5.0: the run has only 1 epochs"),
    (TRAIN + ["--train-limit", "100000"], "--train-limit 100000: the digits8 training images number 1500"),
    (TRAIN + ["--eval-limit", "100000"], "--eval-limit 100000: the test images number 297"),
    (TRAIN + ["--arch", "resnet18", "--width", "4"], "architecture 'resnet18' takes no option width"),
    # eval (PGD only: without torchattacks, asking for AutoAttack is refused before the model is read)
    (["eval", "@missing.pt", "--attacks", "pgd", "--eps", "0.1"], "missing.pt"),
    (["eval", "@empty.pt", "--attacks", "pgd", "--eps", "0.1"], "empty.pt"),
    (["eval", "@corrupt.pt", "--attacks", "pgd", "--eps", "0.1"], "corrupt.pt"),
    (["eval", "@truncated.pt", "--attacks", "pgd", "--eps", "0.1"], "truncated.pt: not a readable checkpoint"),
    (EVAL + ["-n", "100000"], "-n/--samples 100000: the digits split has 297 images"),
    (EVAL + ["--logits", "3"], "logits=3 was given, but the model returned a tensor"),
    (EVAL + ["--data", "synthetic-mnist"], "model.pt: the model does not take the synthetic images of shape [1, 28, 28]"),
    (SENS + ["--data", "synthetic-mnist"], "the model does not take the synthetic images"),
    (REPORT + ["--data", "synthetic-mnist"], "the model does not take the synthetic images"),
    (EVAL + ["--json", "@nowhere/out.json"], "--json"),
    (EVAL + ["-n", "-5"], "--samples"),
    (EVAL + ["--num", "5"], "-n/--samples"),
    (EVAL + ["--eps", "8/0"], "--eps"),
    (EVAL + ["--data-root", "@no-data"], "--root"),
    (EVAL + ["--eps", "-1"], "--eps"),
    (EVAL + ["--steps", "0"], "--steps"),
    (EVAL + ["--batch-size", "0"], "--batch-size"),
    (EVAL + ["--device", "foo"], "--device"),
    (EVAL + ["--threads", "0"], "--threads"),
    (EVAL + ["--attacks", "clean,nope"], "--attacks"),
    (EVAL + ["--attacks", " , "], "--attacks: no attack given"),
    # sensitivity
    (SENS + ["--out", "@a-file"], "--out"),
    (SENS + ["--samples", "-1"], "--samples"),
    (SENS + ["--layers", "nn.Nope"], "--layers"),
    (SENS + ["--layers", ","], "--layers"),
    (SENS + ["--data-root", "@no-data"], "--root"),
    (["sensitivity", "--model", "@run/model.pt", "--out", "@sens"], "positional MODEL"),
    (SENS + ["--batch-size", "0"], "--batch-size"),
    (SENS + ["--eps", "inf"], "--eps"),
    (SENS + ["--steps", "0"], "--steps"),
    (SENS + ["--top", "0"], "--top"),
    (["sensitivity", "@empty.pt", "--out", "@sens"], "empty.pt"),
    (SENS + ["--compare", "@a-file"], "a-file"),
    (SENS + ["--compare", "@truncated.pt"], "truncated.pt: not a JSON report"),
    (SENS + ["--compare", "@other.json"], "other.json: expected format"),
    # report
    (REPORT + ["--seeds", "0"], "--seeds"),
    (REPORT + ["-n", "-5"], "--samples"),
    (["report", "--models", "@run/model.pt", "@run/model.pt", "--out", "@rep"], "positional MODEL ..."),
    (REPORT + ["--out", "@a-file"], "--out"),
    (REPORT + ["--eps", "-1"], "--eps"),
    (["report", "@corrupt.pt", "--eps", "0.1", "--out", "@rep"], "corrupt.pt"),
    # demo
    (DEMO + ["--epochs", "0"], "--epochs"),
    (DEMO + ["--eps", "-1"], "--eps"),
    (DEMO + ["--threads", "0"], "--threads"),
    (DEMO + ["--out", "@a-file"], "--out"),
]


@pytest.mark.parametrize("argv, names", CASES, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in CASES])
def test_user_errors_give_one_line(files, capsys, argv, names):
    line = one_line_error(capsys, sub(files, argv))
    assert names in line, line


@pytest.mark.skipif(CUDA, reason="checks the message given without a GPU")
def test_cuda_without_a_gpu_is_one_line(files, capsys):
    line = one_line_error(capsys, sub(files, EVAL + ["--device", "cuda"]))
    assert "--device" in line and "CUDA" in line


def test_sensitivity_refuses_a_bad_out_before_measuring(files, capsys, monkeypatch):
    import neurosens.sensitivity

    monkeypatch.setattr(neurosens.sensitivity, "measure", lambda *a, **k: pytest.fail("measured before checking --out"))
    one_line_error(capsys, sub(files, SENS + ["--out", "@a-file"]))


def test_eval_without_torchattacks_says_how_to_install(files, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchattacks", None)
    line = one_line_error(capsys, sub(files, ["eval", "@run/model.pt", "--attacks", "clean,autoattack"]))
    assert "pip install 'neurosens[attacks]'" in line and "--attacks" in line


@pytest.mark.parametrize("attack", ["square", "autoattack"])
def test_sensitivity_without_torchattacks_says_how_to_install(files, capsys, monkeypatch, attack):
    import sys

    monkeypatch.setitem(sys.modules, "torchattacks", None)
    line = one_line_error(capsys, sub(files, SENS + ["--attack", attack, "--eps", "0.1"]))
    assert "needs the optional package torchattacks" in line and "pip install 'neurosens[attacks]'" in line


def test_ctrl_c_is_one_line_and_status_130(files, capsys, monkeypatch):
    import neurosens.commands.eval as command

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "run", interrupted)
    assert main(sub(files, EVAL)) == 130
    assert capsys.readouterr().err == "neurosens eval: interrupted\n"


@pytest.mark.parametrize("extra, message", [
    (["--metric", "cosine"], "l1.json: it measures l1 distances, this run cosine; give the same --metric and --relative"),
    (["--relative"], "it measures l1 distances, this run l1 (relative)"),
])
def test_sensitivity_refuses_a_report_it_cannot_compare_with_before_measuring(files, capsys, monkeypatch, extra, message):
    import neurosens.sensitivity

    monkeypatch.setattr(neurosens.sensitivity, "measure", lambda *a, **k: pytest.fail("measured before checking --compare"))
    line = one_line_error(capsys, sub(files, SENS + ["--compare", "@l1.json", "--eps", "0.1"] + extra))
    assert message in line, line

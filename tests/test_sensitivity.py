import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from neurosens import reference
from neurosens.sensitivity import NeuronSensitivity, measure


class Block(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv2(self.relu(self.bn1(self.conv1(x)))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.layer1 = nn.Sequential(Block(6, 6), Block(6, 10, 2))
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(10, 4)

    def forward(self, x):
        x = self.layer1(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(self.drop(x.mean((2, 3))))


class Tokens(nn.Module):
    """[N, T, C] token layout: neurons are along the last dim."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(5, 12)
        self.mix = nn.Linear(12, 7)

    def forward(self, x):
        return self.mix(torch.tanh(self.embed(x))).mean(1)


class Flat(nn.Module):
    def forward(self, x):
        return x.flatten(1)


def make_net(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    net = Net().to(dtype)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode matters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net


def make_data(n=50, dtype=torch.float64, seed=1, shape=(1, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=dtype)
    x_adv = x + 0.3 * torch.randn(n, *shape, generator=g, dtype=dtype)
    y = torch.randint(0, 4, (n,), generator=g)
    return x, x_adv, y


def oracle(model, x, x_adv, names, metric="l1", relative=False, channel_dim=1):
    """One-shot float64 sensitivity: two separate eval forwards over all data, plain hooks."""
    model = copy.deepcopy(model).double().eval()
    modules = dict(model.named_modules())
    outs = {}
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: outs.setdefault(n, []).append(o)) for n in names]
    with torch.no_grad():
        model(x.double())
        model(x_adv.double())
    for h in handles:
        h.remove()
    return {n: reference.neuron_distance_per_sample(a, b, metric, channel_dim, relative).mean(0) for n, (a, b) in outs.items()}


def hook_counts(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def stream(model, x, x_adv, batch, **kwargs):
    meter = NeuronSensitivity(model, **kwargs)
    for i in range(0, len(x), batch):
        meter.update(x[i:i + batch], x_adv[i:i + batch])
    return meter.compute()


CONVS = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2", "fc"]


@pytest.mark.parametrize("metric, relative", [("l1", False), ("l2", False), ("cosine", False), ("l1", True), ("l2", True)])
def test_streaming_equals_one_shot_reference(metric, relative):
    net = make_net()
    x, x_adv, y = make_data(50)
    report = stream(net, x, x_adv, batch=16, metric=metric, relative=relative)  # batches of 16, 16, 16, 2
    expected = oracle(net, x, x_adv, CONVS, metric, relative)
    assert report.layers == CONVS
    assert report.meta["samples"] == 50 and report.meta["metric"] == metric
    for name in CONVS:
        torch.testing.assert_close(report[name], expected[name], rtol=1e-6, atol=1e-12)


def test_float32_model_matches_float64_reference():
    net = make_net(torch.float32)
    x, x_adv, _ = make_data(40, torch.float32)
    report = stream(net, x, x_adv, batch=13)
    expected = oracle(net, x, x_adv, CONVS)
    for name in CONVS:
        torch.testing.assert_close(report[name], expected[name], rtol=1e-4, atol=1e-7)


def test_batch_size_does_not_change_the_result():
    net = make_net()
    x, x_adv, _ = make_data(60)
    reports = [stream(net, x, x_adv, batch=b) for b in (60, 7, 1)]
    for other in reports[1:]:
        for name in CONVS:
            torch.testing.assert_close(other[name], reports[0][name], rtol=1e-12, atol=1e-15)


def test_token_layout_channel_dim_last():
    torch.manual_seed(0)
    model = Tokens().double()
    x, x_adv, _ = make_data(20, shape=(6, 5))
    report = stream(model, x, x_adv, batch=8, channel_dim=-1)
    expected = oracle(model, x, x_adv, ["embed", "mix"], channel_dim=-1)
    assert report["embed"].shape == (12,) and report["mix"].shape == (7,)
    for name in ("embed", "mix"):
        torch.testing.assert_close(report[name], expected[name], rtol=1e-6, atol=1e-12)
    per_layer = stream(model, x, x_adv, batch=8, channel_dim={"embed": -1, "mix": -1})
    torch.testing.assert_close(per_layer["mix"], report["mix"], rtol=0, atol=0)


def test_shared_module_reported_per_call():
    net = make_net()
    x, x_adv, _ = make_data(10)
    report = stream(net, x, x_adv, batch=4, layers="layer1.0.relu")
    assert report.layers == ["layer1.0.relu#0", "layer1.0.relu#1"]
    with torch.no_grad():
        net.eval()
        block = net.layer1[0]
        h, h_adv = (torch.relu(net.bn1(net.conv1(v))) for v in (x, x_adv))
        first = reference.neuron_distance(block.relu(block.bn1(block.conv1(h))), block.relu(block.bn1(block.conv1(h_adv)))) / 10
    torch.testing.assert_close(report["layer1.0.relu#0"], first, rtol=1e-6, atol=1e-12)


class FGSM:
    """A small attack for the tests; records the model's mode while it runs."""

    def __init__(self, model, eps=0.1):
        self.model, self.eps, self.modes = model, eps, []

    def __call__(self, x, y):
        self.modes.append(self.model.training)
        x = x.clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(self.model(x), y)
        (grad,) = torch.autograd.grad(loss, x)
        return (x + self.eps * grad.sign()).detach()


def test_attack_path_and_state_unchanged():
    net = make_net()
    net.train()
    net.bn1.eval()  # a frozen BatchNorm: mixed modes must come back as they were
    modes = {name: m.training for name, m in net.named_modules()}
    state = copy.deepcopy(net.state_dict())
    x, _, y = make_data(24)
    atk = FGSM(net)
    meter = NeuronSensitivity(net, layers=["conv1", "fc"])
    meter.update(x[:12], y[:12], attack=atk)
    meter.update(x[12:], y=y[12:], attack=atk)
    report = meter.compute()

    assert atk.modes == [False, False]  # adversarial inputs are crafted against the eval-mode model
    assert {name: m.training for name, m in net.named_modules()} == modes
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert hook_counts(net) == 0

    net.eval()
    x_adv = torch.cat([atk(x[:12], y[:12]), atk(x[12:], y[12:])])
    expected = oracle(net, x, x_adv, ["conv1", "fc"])
    torch.testing.assert_close(report["fc"], expected["fc"], rtol=1e-6, atol=1e-12)
    with torch.no_grad():
        clean, adv = (net(v).argmax(1) == y for v in (x, x_adv))
    assert report.meta["clean_accuracy"] == pytest.approx(clean.double().mean().item())
    assert report.meta["adversarial_accuracy"] == pytest.approx(adv.double().mean().item())


def test_hooks_gone_and_sums_untouched_after_an_exception():
    net = make_net()
    x, x_adv, _ = make_data(8)
    meter = NeuronSensitivity(net)
    meter.update(x, x_adv)
    before = meter.compute()

    def broken_attack(x, y):
        raise RuntimeError("attack failed")

    with pytest.raises(RuntimeError, match="attack failed"):
        meter.update(x, torch.zeros(8, dtype=torch.long), attack=broken_attack)
    with pytest.raises(RuntimeError):
        meter.update(torch.randn(8, 3, 8, 8, dtype=torch.float64), torch.randn(8, 3, 8, 8, dtype=torch.float64))
    assert hook_counts(net) == 0
    assert net.training
    after = meter.compute()
    assert after.meta["samples"] == 8
    for name in before.layers:
        assert torch.equal(after[name], before[name])


def test_failure_inside_a_hook_rolls_back_the_batch():
    net = nn.Sequential(nn.Linear(4, 3), Flat(), nn.Linear(3, 2)).double()
    meter = NeuronSensitivity(net, layers=["0", "2"], channel_dim={"0": 1, "2": 5})
    with pytest.raises(ValueError, match=r"layer '2': channel_dim=5 is out of range"):
        meter.update(torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64))
    assert meter.samples == 0 and hook_counts(net) == 0
    with pytest.raises(RuntimeError, match="no batch seen yet"):
        meter.compute()


def test_reset_forgets_everything():
    net = make_net()
    x, x_adv, _ = make_data(20)
    meter = NeuronSensitivity(net)
    meter.update(x[:10], x_adv[:10])
    meter.reset()
    meter.update(x[10:], x_adv[10:])
    expected = oracle(net, x[10:], x_adv[10:], CONVS)
    report = meter.compute()
    assert report.meta["samples"] == 10
    torch.testing.assert_close(report["conv1"], expected["conv1"], rtol=1e-6, atol=1e-12)


def test_argument_and_shape_errors():
    net = make_net()
    x, x_adv, _ = make_data(4)
    with pytest.raises(ValueError, match=r"unknown metric='l3'"):
        NeuronSensitivity(net, metric="l3")
    with pytest.raises(ValueError, match=r"relative=True is not defined for metric='cosine'"):
        NeuronSensitivity(net, metric="cosine", relative=True)
    with pytest.raises(ValueError, match=r"channel_dim names layers that are not selected: bn1"):
        NeuronSensitivity(net, layers="conv1", channel_dim={"bn1": 1})
    meter = NeuronSensitivity(net)
    with pytest.raises(ValueError, match=r"give the adversarial inputs"):
        meter.update(x)
    with pytest.raises(ValueError, match=r"x of shape \[4, 1, 8, 8\] and x_adv of shape \[3, 1, 8, 8\] differ"):
        meter.update(x, x_adv[:3])
    with pytest.raises(ValueError, match=r"an attack needs the labels"):
        meter.update(x, attack=lambda x, y: x)


def test_layer_errors_name_the_layer():
    seq = nn.Sequential(nn.Linear(4, 6), Flat(), nn.Linear(6, 2), nn.Linear(2, 2)).double()
    seq.forward = lambda x: seq[2](seq[1](seq[0](x)))  # seq[3] never runs
    x = torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"layer\(s\) '3' never ran in the forward pass"):
        NeuronSensitivity(seq, layers=["0", "3"]).update(x, x)

    class SumOut(nn.Module):
        def forward(self, x):
            return x.sum(1)

    with pytest.raises(ValueError, match=r"layer '0': output of shape \[10\] has no channel dim"):
        NeuronSensitivity(nn.Sequential(SumOut()), layers="0").update(x, x)

    class BatchSecond(nn.Module):
        def forward(self, x):
            return x.t()

    with pytest.raises(RuntimeError, match=r"layer '0': output of shape \[4, 10\] has 4 rows, expected 10"):
        NeuronSensitivity(nn.Sequential(BatchSecond()), layers="0").update(x, x)

    images = nn.Sequential(Flat())
    meter = NeuronSensitivity(images, layers="0")
    meter.update(torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4))
    with pytest.raises(RuntimeError, match=r"layer '0': output of shape \[4, 25\] has 25 neurons along dim 1, earlier batches had 16"):
        meter.update(torch.randn(2, 1, 5, 5), torch.randn(2, 1, 5, 5))


def test_measure_with_attack_and_with_given_pairs():
    net = make_net()
    x, x_adv, y = make_data(30)
    by_pairs = measure(net, [(x[i:i + 8], x_adv[i:i + 8], y[i:i + 8]) for i in range(0, 30, 8)], progress=False)
    expected = stream(net, x, x_adv, batch=30)
    for name in CONVS:
        torch.testing.assert_close(by_pairs[name], expected[name], rtol=1e-12, atol=1e-15)
    assert by_pairs.meta["attack"] == "given adversarial inputs" and "clean_accuracy" in by_pairs.meta

    def shift(x, y):
        return x + 0.3

    loader = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 30, 8)]
    attacked = measure(net, loader, attack=shift, layers="fc", max_batches=2, progress=False, meta={"label": "shifted"})
    expected = stream(net, x[:16], x[:16] + 0.3, batch=16, layers="fc")
    torch.testing.assert_close(attacked["fc"], expected["fc"], rtol=1e-12, atol=1e-15)
    assert attacked.meta["samples"] == 16 and attacked.meta["attack"] == "shift" and attacked.meta["label"] == "shifted"
    with pytest.raises(TypeError, match=r"each batch must be a tuple"):
        measure(net, [x], progress=False)


def _ddp_worker(rank, world, init_file, x, x_adv, y, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        net = make_net()
        meter = NeuronSensitivity(net, layers=["conv1", "fc"])
        lo, hi = (0, 20) if rank == 0 else (20, len(x))  # unequal shards, several batches each
        for i in range(lo, hi, 7):
            stop = min(i + 7, hi)
            meter.update(x[i:stop], x_adv[i:stop], y=y[i:stop])
        report = meter.compute()
        torch.save({"fc": report["fc"], "conv1": report["conv1"], "meta": report.meta}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_sums_are_all_reduced(tmp_path):
    x, x_adv, y = make_data(33)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), x, x_adv, y, str(tmp_path)), nprocs=2, join=True)
    expected = oracle(make_net(), x, x_adv, ["conv1", "fc"])
    single = NeuronSensitivity(make_net(), layers=["conv1", "fc"])
    single.update(x, x_adv, y=y)
    single = single.compute()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["meta"]["samples"] == 33
        assert got["meta"]["clean_accuracy"] == pytest.approx(single.meta["clean_accuracy"])
        for name in ("conv1", "fc"):
            torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-12)


def test_command_writes_report_csv_and_plots(tmp_path, capsys):
    from neurosens.cli import main
    from neurosens.models import build_model
    from neurosens.report import SensitivityReport

    spec = {"name": "small-cnn", "num_classes": 10, "in_channels": 1, "input_size": 28}
    torch.manual_seed(0)
    torch.save({"model": build_model(**spec).state_dict(), "meta": {"model": spec, "data": "digits"}, "config": {"eps": 0.1}},
               tmp_path / "model.pt")
    out = tmp_path / "out"
    args = ["sensitivity", str(tmp_path / "model.pt"), "--samples", "24", "--batch-size", "10", "--steps", "2",
            "--layers", "conv*,nn.Linear", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    report = SensitivityReport.from_json(out / "report.json")
    assert report.layers == ["conv1", "conv2", "fc1", "fc2"]
    assert report.meta["samples"] == 24 and report.meta["eps"] == 0.1 and report.meta["data"] == "digits"
    assert report.meta["attack"].startswith("PGD(eps=0.1")
    for name in ("sensitivity.csv", "layer_means.csv", "layer_means.png", "histograms.png", "sorted.png"):
        assert (out / name).stat().st_size > 0, name
    assert "most sensitive" in capsys.readouterr().out

    torch.save({"model": build_model(**spec).state_dict()}, tmp_path / "bare.pt")
    with pytest.raises(SystemExit, match="does not record its architecture; give --arch"):
        main(["sensitivity", str(tmp_path / "bare.pt"), "--data", "digits", "--eps", "8/255", "--out", str(out)])
    assert main(["sensitivity", str(tmp_path / "bare.pt"), "--arch", "small-cnn", "--data", "digits", "--eps", "8/255",
                 "--attack", "fgsm", "--samples", "8", "--layers", "fc2", "--out", str(tmp_path / "bare"), "--no-progress",
                 "--compare", str(out / "report.json")]) == 0
    assert SensitivityReport.from_json(tmp_path / "bare" / "report.json").meta["eps"] == pytest.approx(8 / 255)
    # Two budgets: each column of the comparison says its own.
    assert (tmp_path / "bare" / "layer_means.csv").read_text().splitlines()[0].split(",")[1:3] == \
        [f"{tmp_path.name} (eps 0.1)", f"{tmp_path.name} (eps 0.0313725)"]
    with pytest.raises(SystemExit, match="no layer named 'conv9'"):
        main(["sensitivity", str(tmp_path / "model.pt"), "--layers", "conv9", "--out", str(out)])

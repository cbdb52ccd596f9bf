"""Sensitivity while training: the per-layer neuron sensitivity and the clean and robust accuracy
of a fixed probe set, measured at chosen steps of any training loop.

A measurement crafts the probe's adversarial twins anew against the model as it is now (that is
the point: the model changes, the probe and the attack do not), with the attack's randomness drawn
from a fixed seed, and streams both through :class:`~neurosens.sensitivity.NeuronSensitivity`, so
no activation is kept. The model is measured in eval mode and every module gets its own mode back;
the RNG states of torch, CUDA, numpy and Python are restored afterwards, so a run trains the same
weights with and without a monitor. Under ``torch.distributed`` each rank measures its share of
the probe and the sums are added, so every rank gets the same record.
"""
import time

import torch
import torch.distributed as dist

from .attacks import make_attack
from .checkpoint import rng_state, set_rng_state
from .env import model_device, require
from .sensitivity import NeuronSensitivity

#: The ``every=`` word for "at the end of every epoch".
EPOCH = "epoch"


def parse_every(every, where="SensitivityMonitor"):
    """``every`` as ``(steps or None, at epoch ends)``: an int N >= 1 (every N steps), ``"epoch"``,
    or a list/tuple holding one of each."""
    entries = list(every) if isinstance(every, (list, tuple)) else [every]
    steps, epochs = None, False
    for entry in entries:
        if entry == EPOCH and not epochs:
            epochs = True
        elif isinstance(entry, int) and not isinstance(entry, bool) and entry >= 1 and steps is None:
            steps = entry
        else:
            raise ValueError(f"{where}: every={every!r}: give a number of steps >= 1, {EPOCH!r}, or one of each "
                             f"as a pair such as (100, {EPOCH!r})")
    return steps, epochs


def probe_tensors(probe, where="SensitivityMonitor"):
    """The probe as one ``(x, y)`` pair of CPU tensors: a pair of tensors, or every batch of a
    loader yielding ``(x, y, ...)``, read once so that every measurement sees the same images."""
    if isinstance(probe, (tuple, list)) and len(probe) == 2 and all(isinstance(t, torch.Tensor) for t in probe):
        x, y = probe
    elif isinstance(probe, torch.utils.data.DataLoader):
        batches = [(batch[0], batch[1]) for batch in probe]
        if not batches:
            raise ValueError(f"{where}: the probe loader yields no batch")
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    else:
        raise TypeError(f"{where}: probe must be a pair of tensors (x, y) or a DataLoader, got {type(probe).__name__}")
    if x.dim() < 2 or y.dim() != 1 or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"{where}: the probe must be images [N, ...] with N >= 1 and labels [N], got x of shape "
                         f"{list(x.shape)} and y of shape {list(y.shape)}")
    if y.is_floating_point():
        raise ValueError(f"{where}: the probe's labels must be integers, got {y.dtype}")
    return x.detach().cpu(), y.detach().cpu()


def require_tensorboard():
    """TensorBoard's ``SummaryWriter`` class; :class:`~neurosens.env.MissingDependency` saying what
    to install when ``torch.utils.tensorboard`` or the tensorboard package is missing."""
    return require("torch.utils.tensorboard", "TensorBoard logging", "tensorboard", "pip install tensorboard").SummaryWriter


def tensorboard_writer(log_dir):
    """A TensorBoard ``SummaryWriter`` writing to ``log_dir`` (see :func:`require_tensorboard`)."""
    return require_tensorboard()(str(log_dir))


class SensitivityMonitor:
    """Measure ``model`` on a fixed ``probe`` with a fixed ``attack`` while it trains.

    ``probe`` is a pair of tensors ``(x, y)`` or a DataLoader (read once). ``attack`` is an attack
    object bound to ``model`` (``attack(x, y) -> x_adv``), or a name of
    :data:`neurosens.attacks.ATTACKS` built with ``eps``, ``norm``, ``alpha`` and ``steps``.
    ``every`` is a number of steps, ``"epoch"`` (at :meth:`epoch_end`), both as a pair such as
    ``(100, "epoch")``, or None (only when :meth:`measure` is called). ``seed`` seeds the attack's
    randomness at every measurement. ``layers``, ``metric`` and ``logits`` are those of
    :class:`~neurosens.sensitivity.NeuronSensitivity`. ``writer`` is anything with
    ``add_scalar(tag, value, step)``, such as a TensorBoard ``SummaryWriter``
    (:func:`tensorboard_writer`); only rank 0 writes to it.

    In the loop, call :meth:`step` after each optimizer step and :meth:`epoch_end` after each
    epoch; :meth:`measure` measures now (before training, say). Each measurement appends to
    :attr:`history` a record ``{"step", "epoch", "samples", "clean", "robust", "sensitivity":
    {layer: mean over its neurons}, "seconds"}``; ``step`` counts the steps so far and ``epoch``
    the epoch they belong to (0 before training).
    """

    def __init__(self, model, probe, attack="pgd", every=EPOCH, eps=None, norm="linf", alpha=None, steps=None,
                 layers="auto", metric="l1", batch_size=256, seed=0, logits=None, writer=None):
        where = "SensitivityMonitor"
        self.every_steps, self.every_epoch = (None, False) if every is None else parse_every(every, where)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"{where}: batch_size={batch_size!r}: must be an integer >= 1")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"{where}: seed={seed!r} must be an int")
        self.x, self.y = probe_tensors(probe, where)
        distributed = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        if len(self.x) < self.world:
            raise ValueError(f"{where}: a probe of {len(self.x)} images cannot be shared by {self.world} processes")
        if isinstance(attack, str):
            if eps is None:
                raise ValueError(f"{where}: attack={attack!r} needs its budget eps=")
            attack = make_attack(attack, model, eps, norm=norm, alpha=alpha, steps=steps, seed=seed, logits=logits)
        elif not callable(attack):
            raise TypeError(f"{where}: attack must be an attack object (attack(x, y) -> x_adv) or a name, "
                            f"got {type(attack).__name__}")
        elif getattr(attack, "model", model) is not model:
            raise ValueError(f"{where}: the attack is bound to another model than the one monitored; build it on this one")
        self.model, self.attack = model, attack
        if logits is None:
            logits = getattr(attack, "logits", None)
        self.meter = NeuronSensitivity(model, layers, metric, logits=logits)
        self.batch_size, self.seed, self.writer = batch_size, seed, writer
        self.steps, self.epochs, self._epoch_end_step = 0, 0, 0
        self.history = []

    def step(self):
        """Count one training step; measure when ``every`` steps have passed."""
        self.steps += 1
        if self.every_steps and self.steps % self.every_steps == 0:
            return self.measure()
        return None

    def epoch_end(self):
        """Count one epoch; measure when ``every`` asks for epoch ends and this step was not
        measured already."""
        self.epochs += 1
        self._epoch_end_step = self.steps
        if self.every_epoch and not (self.history and self.history[-1]["step"] == self.steps):
            return self.measure()
        return None

    def measure(self):
        """Measure now, append the record to :attr:`history` and return it."""
        started = time.perf_counter()
        device = model_device(self.model)
        x, y = self.x[self.rank::self.world], self.y[self.rank::self.world]
        saved = rng_state()
        try:
            torch.manual_seed(self.seed)
            self.meter.reset()
            for i in range(0, len(x), self.batch_size):
                self.meter.update(x[i:i + self.batch_size].to(device), y[i:i + self.batch_size].to(device), attack=self.attack)
            report = self.meter.compute()
        finally:
            set_rng_state(saved)
        record = {"step": self.steps, "epoch": self._current_epoch(), "samples": report.meta["samples"],
                  "clean": report.meta["clean_accuracy"], "robust": report.meta["adversarial_accuracy"],
                  "sensitivity": report.layer_means(), "seconds": time.perf_counter() - started}
        self.history.append(record)
        self._log(record)
        return record

    def _current_epoch(self):
        """The epoch the current step belongs to: the one just ended when nothing ran since, else the
        one in progress (0 before training)."""
        return self.epochs if self.steps == self._epoch_end_step else self.epochs + 1

    def _log(self, record):
        if self.writer is None or self.rank != 0:
            return
        step = record["step"]
        self.writer.add_scalar("probe/clean_accuracy", record["clean"], step)
        self.writer.add_scalar("probe/robust_accuracy", record["robust"], step)
        for layer, value in record["sensitivity"].items():
            self.writer.add_scalar(f"sensitivity/{layer}", value, step)
        if hasattr(self.writer, "flush"):
            self.writer.flush()

    def state_dict(self):
        """Counters and records, to continue a run where it stopped."""
        return {"steps": self.steps, "epochs": self.epochs, "epoch_end_step": self._epoch_end_step,
                "history": [dict(r) for r in self.history]}

    def load_state_dict(self, state):
        self.steps, self.epochs, self._epoch_end_step = state["steps"], state["epochs"], state["epoch_end_step"]
        self.history = [dict(r) for r in state["history"]]

    def plot(self, path=None, title=None):
        """The records as a figure (:func:`neurosens.plots.plot_monitor`); saved to ``path`` when given."""
        from .plots import plot_monitor

        return plot_monitor(self.history, path=path, title=title)


def describe_record(record):
    """One line for a progress log: where, the accuracies and each layer's mean sensitivity."""
    layers = " ".join(f"{layer}={value:.4g}" for layer, value in record["sensitivity"].items())
    return (f"monitor step={record['step']} epoch={record['epoch']} clean={record['clean']:.4g} "
            f"robust={record['robust']:.4g} sensitivity: {layers}")


def monitor_records(history):
    """The monitor records of a run's per-epoch ``history`` (its metrics.jsonl lines), in order."""
    return [record for h in history for record in h.get("monitor", [])]


def write_run_report(out_dir, config, history):
    """``<out_dir>/report.html``: the run's options, its per-epoch metrics and, when ``history``
    holds monitor records, their figure (also written as ``monitor.png``). Returns the page's path."""
    from pathlib import Path

    from .page import write_run_html
    from .plots import plot_monitor

    out_dir = Path(out_dir)
    records = monitor_records(history)
    figure = None
    if records:
        figure = out_dir / "monitor.png"
        plot_monitor(records, path=figure, title=f"sensitivity while training ({config['config'].get('method', 'run')})")
    return write_run_html(out_dir / "report.html", f"neurosens run {out_dir.name}", config, history, records, figure)

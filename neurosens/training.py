"""Training runs: the options of a run, the Trainer, and distributed set-up.

The training methods and their losses are in :mod:`neurosens.methods`.

Everything a run needs to continue bit-identically sits in ``<out_dir>/checkpoint.pt``, written
atomically after every epoch: model, optimizer, scheduler, grad scaler, the RNG states of torch,
CUDA, numpy and Python on every rank, the epoch and the metrics so far. The data order is a function
of (seed, epoch) alone. All checkpoints hold only tensors and primitive containers, so
``torch.load(path, weights_only=True)`` reads them.
"""
import dataclasses
import json
import math
import os
import random
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Subset
from tqdm.auto import tqdm

from .attacks import PGD
from .checkpoint import load_checkpoint, remove_stale_temporaries, rng_state, save_checkpoint, set_rng_state
from .data import make_loader
from .env import default_device
from .evaluation import evaluate
from .methods import ALP_DISTANCES, METHODS, make_loss
from .monitor import EPOCH, SensitivityMonitor, describe_record, monitor_records, tensorboard_writer, write_run_report
from .outputs import check_logits
from .sns import SNSConfig

CHECKPOINT = "checkpoint.pt"
FINAL = "model.pt"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"


@dataclasses.dataclass
class TrainConfig:
    """Options of a run. ``batch_size`` is global (split across DDP ranks); ``eps``, ``alpha`` and
    ``steps`` set the training PGD (``alpha`` defaults to 2.5 * eps / steps); ``eps_warmup`` ramps
    eps linearly over that many epochs (step s, from 0, of W warm-up steps attacks at eps * (s + 1) / W,
    so the first at eps / W and the last at eps); ``milestones`` (fractions of the run) and ``gamma``
    shape the step schedule; ``eval_*`` set the per-epoch PGD evaluation on the first ``eval_limit``
    test images. ``beta`` weighs TRADES; ``alp_lam`` and ``alp_distance`` set adversarial logit
    pairing. ``sns_<name>`` is the option ``<name>`` of :class:`~neurosens.sns.SNSConfig`
    (``sns_layers``: a list of names or patterns, or a preset of
    :data:`~neurosens.sns.LAYER_PRESETS`; ``sns_refresh``: batches between selections, or "epoch").
    ``logits`` says where a model's output holds the logits, as a key or an index
    (:mod:`neurosens.outputs`; a callable does not fit in the run's JSON config: give it to the
    attack of a ``loss_fn`` of your own). ``monitor`` > 0 measures sensitivity while training
    (:class:`~neurosens.monitor.SensitivityMonitor`) on the first ``monitor`` test images before
    training, every ``monitor_every`` steps (0: none between) and at every epoch end, attacked by
    the evaluation's PGD (eps, ``eval_alpha``) with ``monitor_steps`` steps (default: ``eval_steps``);
    ``monitor_tensorboard`` also logs the records to ``<out_dir>/tensorboard``."""

    method: str = "standard"
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: tuple = (0.5, 0.75)
    gamma: float = 0.1
    eps: float = 8 / 255
    alpha: float = None
    steps: int = 10
    norm: str = "linf"
    eps_warmup: float = 0.0
    beta: float = 6.0
    alp_lam: float = 1.0
    alp_distance: str = "l2"
    sns_layers: object = SNSConfig.layers
    sns_k: float = SNSConfig.k
    sns_lam: float = SNSConfig.lam
    sns_metric: str = SNSConfig.metric
    sns_select_metric: str = SNSConfig.select_metric
    sns_clean_weight: float = SNSConfig.clean_weight
    sns_adv_examples: str = SNSConfig.adv_examples
    sns_refresh: object = SNSConfig.refresh
    sns_detach_benign: bool = SNSConfig.detach_benign
    sns_forward: str = SNSConfig.forward
    sns_select: str = SNSConfig.select
    sns_seed: int = SNSConfig.seed
    eval_steps: int = 20
    eval_alpha: float = None
    eval_limit: int = 1000
    amp: bool = False
    channels_last: bool = False
    seed: int = 0
    deterministic: bool = True
    num_workers: int = 0
    progress: bool = True
    logits: object = None
    monitor: int = 0
    monitor_every: int = 0
    monitor_steps: int = None
    monitor_tensorboard: bool = False

    OPTIMIZERS = ("sgd", "adam")
    SCHEDULES = ("cosine", "step", "constant")
    #: Options a resumed run may change: they do not touch what is trained or in which order (the
    #: per-epoch evaluation draws from its own copy of the RNG state).
    RESUMABLE_CHANGES = ("progress", "num_workers", "eval_steps", "eval_alpha", "eval_limit", "monitor_tensorboard")

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is unknown; expected one of {', '.join(METHODS)}")
        if self.optimizer not in self.OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} is unknown; expected one of {', '.join(self.OPTIMIZERS)}")
        if self.schedule not in self.SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is unknown; expected one of {', '.join(self.SCHEDULES)}")
        for name in ("epochs", "batch_size", "steps", "eval_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be >= 1")
        for name in ("lr", "gamma"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be a finite number > 0")
        for name in ("eps", "eps_warmup", "momentum", "weight_decay", "beta", "alp_lam"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be a finite number >= 0")
        if self.momentum >= 1:
            raise ValueError(f"momentum={self.momentum!r}: must be below 1 (SGD diverges at 1 and above)")
        if self.eps_warmup > self.epochs:
            raise ValueError(f"eps_warmup={self.eps_warmup!r}: the run has only {self.epochs} epochs, so eps would never "
                             "reach its value; give at most epochs")
        if self.alp_distance not in ALP_DISTANCES:
            raise ValueError(f"alp_distance={self.alp_distance!r} is unknown; expected one of {', '.join(ALP_DISTANCES)}")
        if self.eval_limit < 0:
            raise ValueError(f"eval_limit={self.eval_limit!r}: must be >= 0")
        self._check_monitor()
        self.milestones = tuple(float(m) for m in self.milestones)
        if not all(0 < m < 1 for m in self.milestones):
            raise ValueError(f"milestones={list(self.milestones)}: each must be a fraction of the run in (0, 1)")
        if callable(check_logits(self.logits, "TrainConfig")):
            raise ValueError("TrainConfig: logits= must be a key or an index, which the run's config records; "
                             "a callable goes to the attack of a loss_fn of your own")
        if isinstance(self.sns_layers, tuple):
            self.sns_layers = list(self.sns_layers)
        self.sns_config().check("TrainConfig", prefix="sns_", per_epoch=True)
        self._check_method_options()

    def _check_method_options(self):
        """An option of another method than the run's would be ignored: refused, so no run is
        believed to have used it."""
        owners = {"beta": "trades", "alp_lam": "alp", "alp_distance": "alp"}
        owners |= {f"sns_{f.name}": "sns" for f in dataclasses.fields(SNSConfig)}
        for f in dataclasses.fields(self):
            owner = owners.get(f.name)
            value = getattr(self, f.name)
            if owner not in (None, self.method) and value != f.default:
                raise ValueError(f"{f.name}={value!r} is an option of method={owner!r}, but this run's method is "
                                 f"{self.method!r}; leave it out")

    def _check_monitor(self):
        for name in ("monitor", "monitor_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be >= 0")
        if self.monitor_steps is not None and self.monitor_steps < 1:
            raise ValueError(f"monitor_steps={self.monitor_steps!r}: must be >= 1")
        if self.monitor == 0:
            given = [name for name in ("monitor_every", "monitor_steps", "monitor_tensorboard")
                     if getattr(self, name) not in (0, None, False)]
            if given:
                raise ValueError(f"{given[0]}={getattr(self, given[0])!r} needs monitor > 0, the number of test images "
                                 "the monitor probes")

    def sns_config(self, steps_per_epoch=None):
        """The ``sns_*`` fields as an :class:`~neurosens.sns.SNSConfig`; ``refresh="epoch"`` becomes
        ``steps_per_epoch`` when that is given."""
        options = {f.name: getattr(self, f"sns_{f.name}") for f in dataclasses.fields(SNSConfig)}
        if options["refresh"] == "epoch" and steps_per_epoch is not None:
            options["refresh"] = steps_per_epoch
        return SNSConfig(**options)

    def to_dict(self):
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in dataclasses.fields(self)}


def _differences(old, new, where):
    """``"where.key: old -> new"`` for every leaf where the nested dicts ``old`` and ``new`` differ."""
    lines = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += _differences(a, b, f"{where}.{key}")
        elif a != b:
            lines.append(f"{where}.{key}: {a!r} -> {b!r}")
    return lines


def seed_everything(seed, deterministic=True):
    """Seed torch, numpy and Python; with ``deterministic``, ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def init_distributed():
    """Join the process group torchrun describes (gloo on CPU, NCCL on GPU); returns (rank, world size)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


class Trainer:
    """Train ``model`` on ``train_set`` with ``config`` (a :class:`TrainConfig`).

    ``out_dir`` receives ``checkpoint.pt`` (every epoch), ``metrics.jsonl`` (one line per epoch),
    ``config.json`` and, at the end, ``model.pt`` (weights, config, metrics and ``meta``: whatever
    the caller wants kept, e.g. ``{"model": build_model arguments, "data": name}``). ``loss_fn``
    overrides the method's loss. ``eval_name`` names what ``test_set`` is ("test", or "val" for
    images held out of the training data): the per-epoch metrics are ``<eval_name>_clean`` and
    ``<eval_name>_pgd``. Under torchrun (after :func:`init_distributed`) the model is
    wrapped in DistributedDataParallel and only rank 0 writes files.
    """

    def __init__(self, model, train_set, test_set=None, config=None, out_dir=None, loss_fn=None, device=None, meta=None,
                 eval_name="test"):
        self.config = cfg = config if config is not None else TrainConfig()
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if self.distributed else (0, 1)
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the {self.world} processes")
        self.device = default_device(device)
        self.amp = cfg.amp and self.device.type == "cuda"
        if cfg.amp and not self.amp:
            warnings.warn("amp=True needs a CUDA device; training in float32")
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.meta = meta or {}
        self.train_set, self.test_set = train_set, test_set
        self.eval_name = eval_name  # what the evaluation set is: the prefix of its metrics
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

        self.model = model.to(self.device, memory_format=self.memory_format)
        self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda" else None) \
            if self.distributed else self.model
        self.steps_per_epoch = math.ceil(math.ceil(len(train_set) / self.world) / (cfg.batch_size // self.world))
        # Built before any training, so bad method options (an unknown layer, k too large) fail first.
        self.loss_fn = loss_fn or make_loss(cfg.method, beta=cfg.beta, alp_lam=cfg.alp_lam, alp_distance=cfg.alp_distance,
                                            model=self.model,
                                            sns=cfg.sns_config(self.steps_per_epoch))
        self.attack = PGD(self.model, cfg.eps, cfg.alpha, cfg.steps, cfg.norm, logits=cfg.logits)
        self._alpha = self.attack.alpha
        self.eval_attack = PGD(self.model, cfg.eps, cfg.eval_alpha, cfg.eval_steps, cfg.norm, logits=cfg.logits)
        self.monitor = self._make_monitor()

        params = self.model.parameters()
        if cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.epoch = 0
        self.history = []

    def _make_monitor(self):
        """The run's :class:`SensitivityMonitor` (None when ``config.monitor`` is 0), checked before any training."""
        cfg = self.config
        if cfg.monitor == 0:
            return None
        if self.test_set is None:
            raise ValueError(f"monitor={cfg.monitor}: the monitor probes the evaluation images, and this run has none")
        if cfg.monitor > len(self.test_set):
            raise ValueError(f"monitor={cfg.monitor}: the {self.eval_name} set has only {len(self.test_set)} images")
        writer = None
        if cfg.monitor_tensorboard:
            if self.out_dir is None:
                raise ValueError("monitor_tensorboard=True needs an out_dir to write the TensorBoard logs into")
            writer = tensorboard_writer(self.out_dir / TENSORBOARD) if self.rank == 0 else None
        probe = make_loader(Subset(self.test_set, range(cfg.monitor)), cfg.monitor)
        attack = PGD(self.model, cfg.eps, cfg.eval_alpha, cfg.monitor_steps or cfg.eval_steps, cfg.norm, logits=cfg.logits)
        return SensitivityMonitor(self.model, probe, attack, every=[cfg.monitor_every, EPOCH] if cfg.monitor_every else EPOCH,
                                  batch_size=max(cfg.batch_size // self.world, 1), seed=cfg.seed, logits=cfg.logits,
                                  writer=writer)

    def _lr_factor(self, step):
        cfg, total = self.config, self.config.epochs * self.steps_per_epoch
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        if cfg.schedule == "step":
            return cfg.gamma ** sum(step >= m * total for m in cfg.milestones)
        return 1.0

    def _eps_at(self, step):
        warmup = self.config.eps_warmup * self.steps_per_epoch
        return self.config.eps * (min(1.0, (step + 1) / warmup) if warmup else 1.0)

    def _to(self, x, y):
        x = x.to(self.device, non_blocking=True)
        if x.dim() == 4:
            x = x.contiguous(memory_format=self.memory_format)
        return x, y.to(self.device, non_blocking=True)

    def train_epoch(self):
        """One pass over the training set; returns the epoch's mean loss and logs."""
        cfg = self.config
        loader = make_loader(self.train_set, cfg.batch_size // self.world, shuffle=True, seed=cfg.seed, epoch=self.epoch,
                             distributed=self.distributed, num_workers=cfg.num_workers)
        self.net.train()
        sums, count = defaultdict(float), 0
        bar = tqdm(loader, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", unit="batch", disable=not cfg.progress or self.rank != 0,
                   leave=False)
        for x, y in bar:
            x, y = self._to(x, y)
            step = self.epoch * self.steps_per_epoch + count
            eps = self._eps_at(step)
            self.attack.eps, self.attack.alpha = eps, self._alpha * (eps / cfg.eps if cfg.eps else 1.0)
            with torch.autocast("cuda", enabled=self.amp):
                loss, logs = self.loss_fn(self.net, x, y, self.attack)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"epoch {self.epoch + 1}, batch {count}: the {cfg.method} loss is {loss.item()}")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            count += 1
            if self.monitor is not None:
                self.monitor.step()
            sums["loss"] += loss.item() * len(y)
            for k, v in logs.items():
                sums[k] += float(v) * len(y)
            sums["n"] += len(y)
            bar.set_postfix(loss=f"{sums['loss'] / sums['n']:.4f}", eps=f"{eps:.3g}")
        keys = sorted(sums)
        totals = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
        if self.distributed:
            dist.all_reduce(totals)
        totals = dict(zip(keys, totals.tolist()))
        n = totals.pop("n")
        return {f"train_{k}": v / n for k, v in totals.items()} | {"train_eps": eps}

    def evaluate(self):
        """Clean and PGD accuracy on the first ``eval_limit`` test images (sharded over the ranks)."""
        cfg = self.config
        if self.test_set is None or cfg.eval_limit == 0:
            return {}
        shard = Subset(self.test_set, range(self.rank, min(cfg.eval_limit, len(self.test_set)), self.world))
        loader = make_loader(shard, max(cfg.batch_size // self.world, 1), num_workers=cfg.num_workers)
        attacks = {"pgd": self.eval_attack} if cfg.eps > 0 else {}
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            result = evaluate(self.model, loader, attacks, self.device, distributed=self.distributed,
                              logits=cfg.logits)
        return {f"{self.eval_name}_{k}": v for k, v in result.items()}

    def state_dict(self):
        rng = rng_state()
        if self.distributed:
            ranks = [None] * self.world
            dist.all_gather_object(ranks, rng)
            rng = ranks
        else:
            rng = [rng]
        return {"format": 1, "epoch": self.epoch, "config": self.config.to_dict(), "meta": self.meta,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": rng, "history": self.history, "world_size": self.world, "train_size": len(self.train_set),
                "loss_state": self.loss_fn.state_dict() if hasattr(self.loss_fn, "state_dict") else None}

    def resume_conflicts(self, state):
        """What differs between this run and the checkpoint ``state`` of the run it would continue,
        as ``"name: old -> new"`` lines (options in :attr:`TrainConfig.RESUMABLE_CHANGES` may differ)."""
        # An option the checkpoint's run predates had its default there.
        old = TrainConfig().to_dict() | dict(state.get("config") or {})
        new = self.config.to_dict()
        lines = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                 if k not in TrainConfig.RESUMABLE_CHANGES and old.get(k) != new.get(k)]
        lines += _differences(state.get("meta") or {}, self.meta, "meta")
        size = state.get("train_size")
        if size is not None and size != len(self.train_set):
            lines.append(f"training samples: {size} -> {len(self.train_set)}")
        return lines

    def load_state_dict(self, state):
        if state["world_size"] != self.world:
            raise ValueError(f"the checkpoint was written by {state['world_size']} processes; resume with as many "
                             f"(now {self.world}) to continue exactly")
        conflicts = self.resume_conflicts(state)
        if conflicts:
            raise ValueError(f"cannot resume the run in {self.out_dir}: its options differ from this run's "
                             f"({'; '.join(conflicts)}); only {', '.join(TrainConfig.RESUMABLE_CHANGES)} may change. "
                             "Start a new run in another folder")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.history = state["epoch"], list(state["history"])
        if self.monitor is not None:
            # The records of the epochs the checkpoint holds; those of an epoch it lost are measured again.
            steps = self.epoch * self.steps_per_epoch
            self.monitor.load_state_dict({"steps": steps, "epochs": self.epoch, "epoch_end_step": steps,
                                          "history": monitor_records(self.history)})
        if state.get("loss_state") is not None:
            self.loss_fn.load_state_dict(state["loss_state"])
        set_rng_state(state["rng"][self.rank])

    def _write(self, name, obj):
        if self.rank == 0 and self.out_dir is not None:
            save_checkpoint(obj, self.out_dir / name)

    def _write_metrics(self):
        if self.rank != 0 or self.out_dir is None:
            return
        tmp = self.out_dir / f".{METRICS}.tmp"
        tmp.write_text("".join(json.dumps(h) + "\n" for h in self.history))
        os.replace(tmp, self.out_dir / METRICS)

    def fit(self, resume=False, until=None):
        """Train to ``config.epochs`` (or stop after epoch ``until``: an interruption that a later
        ``fit(resume=True)`` continues exactly). Returns the per-epoch metrics."""
        cfg = self.config
        path = self.out_dir / CHECKPOINT if self.out_dir is not None else None
        if resume and path is not None and path.is_file():
            # Read on the host: load_state_dict puts the weights and optimizer state on the model's
            # device, and generator states must stay CPU byte tensors.
            self.load_state_dict(load_checkpoint(path))
        else:
            seed_everything(cfg.seed + self.rank, cfg.deterministic)
        if self.out_dir is not None and self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.out_dir)
            # The metrics list exactly the epochs the checkpoint holds, also after a crash between the two writes.
            self._write_metrics()
            (self.out_dir / "config.json").write_text(json.dumps({"config": cfg.to_dict(), "meta": self.meta}, indent=2))
        last = cfg.epochs if until is None else min(until, cfg.epochs)
        if self.monitor is not None and self.epoch == 0 and self.epoch < last:
            self.monitor.measure()
        while self.epoch < last:
            started = time.perf_counter()
            metrics = {"epoch": self.epoch + 1, "lr": self.optimizer.param_groups[0]["lr"]}
            metrics |= self.train_epoch()
            if self.monitor is not None:
                self.monitor.epoch_end()
                records = self.monitor.history[len(monitor_records(self.history)):]
                metrics["monitor"] = records
                metrics["monitor_s"] = sum(r["seconds"] for r in records)
            metrics["train_s"] = time.perf_counter() - started
            metrics |= self.evaluate()
            metrics["epoch_s"] = time.perf_counter() - started
            self.epoch += 1
            self.history.append(metrics)
            if self.rank == 0 and cfg.progress:
                tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
                                    if k != "monitor"))
                if self.monitor is not None:
                    tqdm.write(describe_record(self.monitor.history[-1]))
            self._write(CHECKPOINT, self.state_dict())
            self._write_metrics()
        if self.epoch >= cfg.epochs:
            self._write(FINAL, {"model": self.model.state_dict(), "meta": self.meta, "config": cfg.to_dict(),
                                "history": self.history})
        if self.monitor is not None and self.rank == 0 and self.out_dir is not None:
            write_run_report(self.out_dir, {"config": cfg.to_dict(), "meta": self.meta}, self.history)
        return self.history

"""`neurosens train`: train a model with the standard, PGD-AT, TRADES, ALP or SNS method."""
import dataclasses
import json
from pathlib import Path

#: What a run writes into its folder (--overwrite removes these; anything else there is left alone).
RUN_FILES = ("checkpoint.pt", "model.pt", "metrics.jsonl", "config.json", "monitor.png", "report.html")

HELP = "Train a model (standard, PGD-AT, TRADES, adversarial logit pairing or SNS) with per-epoch clean/PGD evaluation and resumable checkpoints."


def add_arguments(parser):
    from ..data import DATASETS
    from ..models import MODELS
    from ..methods import ALP_DISTANCES, METHODS
    from ..sns import SNSConfig
    from ..training import TrainConfig
    from . import add_eps, add_root, count_or_zero, device, fraction, non_negative, out_dir, positive, positive_int

    d = TrainConfig()
    parser.add_argument("--arch", default="small-cnn", choices=sorted(MODELS), help="architecture (default: small-cnn)")
    parser.add_argument("--width", type=positive_int, help="small-cnn: channels of conv1 (default: 16)")
    parser.add_argument("--data", default="mnist", choices=sorted(DATASETS), help="data set (default: mnist)")
    add_root(parser)
    parser.add_argument("--train-limit", type=positive_int, help="train on a seeded random subset of this many images")
    parser.add_argument("--val", type=positive_int, metavar="N",
                        help="hold out N seeded random training images (before --train-limit) and evaluate each epoch, "
                             "and monitor, on them instead of the test set")
    parser.add_argument("--no-normalize", action="store_true", help="no Normalize layer in the model")
    parser.add_argument("--method", default=d.method, choices=sorted(METHODS), help=f"training method (default: {d.method})")
    add_eps(parser, "8/255", d.eps)
    parser.add_argument("--alpha", type=positive, help="PGD step size while training (default: 2.5 * eps / steps)")
    parser.add_argument("--steps", type=positive_int, default=d.steps, help=f"PGD steps while training (default: {d.steps})")
    parser.add_argument("--norm", default=d.norm, choices=["linf", "l2"], help="attack norm (default: linf)")
    parser.add_argument("--eps-warmup", type=non_negative, default=d.eps_warmup, help="epochs over which eps ramps up linearly, from eps/W on the first of the W warm-up steps (default: 0)")
    parser.add_argument("--beta", type=non_negative, default=d.beta, help=f"TRADES weight (default: {d.beta})")
    parser.add_argument("--alp-lam", type=non_negative, default=d.alp_lam,
                        help=f"adversarial logit pairing: weight of the logit distance (default: {d.alp_lam})")
    parser.add_argument("--alp-distance", default=d.alp_distance, choices=ALP_DISTANCES,
                        help=f"adversarial logit pairing: distance between benign and adversarial logits (default: {d.alp_distance})")
    sns = parser.add_argument_group("SNS (--method sns)")
    for field in dataclasses.fields(SNSConfig):
        flag, meta = "--sns-" + field.name.replace("_", "-"), field.metadata
        if meta["type"] is bool:
            sns.add_argument(flag, action="store_true", help=meta["help"])
        else:
            sns.add_argument(flag, type=meta["type"] and _checked(field), choices=meta["choices"], default=field.default,
                             help=f"{meta['help']} (default: {field.default})")
    parser.add_argument("--epochs", type=positive_int, default=d.epochs, help=f"epochs (default: {d.epochs})")
    parser.add_argument("--batch-size", type=positive_int, default=d.batch_size, help=f"global batch size (default: {d.batch_size})")
    parser.add_argument("--optimizer", default=d.optimizer, choices=TrainConfig.OPTIMIZERS, help=f"(default: {d.optimizer})")
    parser.add_argument("--lr", type=positive, default=d.lr, help=f"peak learning rate (default: {d.lr})")
    parser.add_argument("--momentum", type=non_negative, default=d.momentum, help=f"SGD momentum (default: {d.momentum})")
    parser.add_argument("--weight-decay", type=non_negative, default=d.weight_decay, help=f"(default: {d.weight_decay})")
    parser.add_argument("--schedule", default=d.schedule, choices=TrainConfig.SCHEDULES, help=f"learning-rate schedule (default: {d.schedule})")
    parser.add_argument("--milestones", type=fraction, nargs="+", default=list(d.milestones),
                        help="step schedule: fractions of the run where lr is multiplied by --gamma (default: 0.5 0.75)")
    parser.add_argument("--gamma", type=positive, default=d.gamma, help=f"step schedule factor (default: {d.gamma})")
    parser.add_argument("--eval-steps", type=positive_int, default=d.eval_steps, help=f"PGD steps of the per-epoch evaluation (default: {d.eval_steps})")
    parser.add_argument("--eval-alpha", type=positive, help="its step size (default: 2.5 * eps / eval-steps)")
    parser.add_argument("--eval-limit", type=count_or_zero, default=None,
                        help=f"test images evaluated each epoch, 0 for no evaluation (default: {d.eval_limit}, or all of a "
                             "smaller test set)")
    monitor = parser.add_argument_group("sensitivity while training (--monitor N)")
    monitor.add_argument("--monitor", type=count_or_zero, default=d.monitor, metavar="N",
                         help="measure per-layer sensitivity and clean/PGD accuracy on the first N test images before training, "
                              "at every epoch end and every --monitor-every steps; records go to metrics.jsonl, the figure "
                              "and report.html to OUT (default: 0, off)")
    monitor.add_argument("--monitor-every", type=count_or_zero, default=d.monitor_every, metavar="STEPS",
                         help="also measure every STEPS training steps (default: 0, only at epoch ends)")
    monitor.add_argument("--monitor-steps", type=positive_int, metavar="K",
                         help="PGD steps of the monitor's attack, whose eps and step size are the evaluation's "
                              "(default: --eval-steps)")
    monitor.add_argument("--monitor-tensorboard", action="store_true",
                         help="also log the records to OUT/tensorboard (needs the tensorboard package)")
    parser.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"(default: {d.seed})")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--workers", type=count_or_zero, default=0, help="DataLoader worker processes (default: 0)")
    parser.add_argument("--device", type=device, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--out", type=out_dir, required=True, help="run folder: checkpoint.pt, metrics.jsonl, model.pt")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt when it exists; the options must be the run's, "
                        "except --no-progress, --workers, --eval-steps/--eval-alpha/--eval-limit and --monitor-tensorboard")
    parser.add_argument("--overwrite", action="store_true", help="start over in an OUT that holds a run (default: refused)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or per-epoch lines")


def _checked(field):
    """The type of an ``--sns-*`` flag: the field's parser, then SNSConfig's check of the value."""
    import argparse

    from ..sns import SNSConfig

    def parse(text):
        try:
            value = field.metadata["type"](text)
            SNSConfig(**{field.name: value}).check("SNS", per_epoch=True)
        except (ValueError, TypeError) as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return value

    return parse


def run(args):
    import torch

    from .. import data as datasets
    from ..models import build_model
    from ..monitor import require_tensorboard
    from ..sns import LAYER_PRESETS
    from ..training import Trainer, TrainConfig, init_distributed, seed_everything
    from . import check_at_most

    # Every option of a run is the flag of the same name, except these spellings of the command line.
    given = vars(args) | {"milestones": tuple(args.milestones), "num_workers": args.workers, "progress": not args.no_progress,
                          "sns_layers": args.sns_layers if args.sns_layers in LAYER_PRESETS else args.sns_layers.split(",")}
    config = TrainConfig(**{f.name: given[f.name] for f in dataclasses.fields(TrainConfig)
                            if f.name in given and not (f.name == "eval_limit" and given[f.name] is None)})
    if config.monitor_tensorboard:
        require_tensorboard()  # before any data is read
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite starts it over: give one")
    held = [name for name in RUN_FILES if (Path(args.out) / name).exists()]
    if held and not (args.resume or args.overwrite):
        raise ValueError(f"{args.out} holds a run already ({', '.join(held)}); --resume continues it, --overwrite "
                         "starts it over")
    if held and args.overwrite:
        for name in held:  # nothing of the old run is left beside the new one
            (Path(args.out) / name).unlink()
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, _ = init_distributed()
    train_set = datasets.load(args.data, train=True, root=args.root)
    test_set = datasets.load(args.data, train=False, root=args.root)
    eval_name, meta = "test", {"data": args.data}
    if args.val:
        # The test set is then never seen while training: model choices are made on the held-out images.
        train_set, test_set = train_set.split(args.val, seed=args.seed)
        eval_name, meta["val"] = "val", args.val
    if args.eval_limit is not None:
        check_at_most("--eval-limit", args.eval_limit, len(test_set), f"the {eval_name} images number {len(test_set)}",
                      "0 for no evaluation")
    if args.train_limit:
        check_at_most("--train-limit", args.train_limit, len(train_set), f"the {args.data} training images number "
                      f"{len(train_set)}{' after --val' if args.val else ''}", zero=None)
        train_set = train_set.subset(args.train_limit, seed=args.seed)
    mean, std = (None, None) if args.no_normalize else datasets.stats(args.data)
    channels, size, _ = train_set.shape
    spec = {"name": args.arch, "num_classes": train_set.num_classes, "in_channels": channels, "input_size": size,
            "mean": list(mean) if mean else None, "std": list(std) if std else None}
    if args.width:
        spec["width"] = args.width
    seed_everything(args.seed)  # the same initial weights for a given seed
    model = build_model(**spec)
    trainer = Trainer(model, train_set, test_set, config, out_dir=args.out, device=args.device,
                      meta={"model": spec} | meta, eval_name=eval_name)
    history = trainer.fit(resume=args.resume)
    if rank == 0 and history:
        print(json.dumps(history[-1]))
    return 0

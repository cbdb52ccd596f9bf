import json

HELP = "Show which kernel backends are built and in use."


def add_arguments(parser):
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args):
    from ..extension import info

    details = info()
    if args.json:
        print(json.dumps(details, indent=2))
    else:
        for key, value in details.items():
            print(f"{key:>16}: {value}")
    return 0

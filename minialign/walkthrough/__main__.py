"""python -m minialign.walkthrough ALGO [flags] | --write-docs DIR | --check-docs DIR (see the package docstring)."""

import sys

from minialign.errors import run_cli
from minialign.walkthrough import parser, walk


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.write_docs or args.check_docs:
        from minialign.walkthrough import docs

        if args.write_docs:
            for path in docs.write_docs(args.write_docs):
                print(f"wrote {path}")
            return
        stale = docs.check_docs(args.check_docs)
        for line in stale:
            print(line)
        if stale:
            raise SystemExit(f"{len(stale)} embedded output(s) differ; regenerate them with "
                             f"python -m minialign.walkthrough --write-docs {args.check_docs}")
        print(f"every embedded output in {args.check_docs} matches the code")
        return
    walk(argv)


if __name__ == "__main__":
    run_cli(main)

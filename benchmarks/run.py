#!/usr/bin/env python3
"""Side-by-side benchmark: portproxy against direct, HAProxy, nginx stream and socat.

    python benchmarks/run.py [--quick] [--out DIR] [--repeats N] [--pin/--no-pin]

Needs root: it re-executes itself under ``unshare --net`` and runs everything on the private
namespace's loopback. Missing peers are installed from Debian packages first (``--no-install``
to skip; a peer that stays missing is reported as skipped). Writes latest.md and latest.json
to the output directory (default: benchmarks/results/).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchlib import netns, packages, procs, report, runner  # noqa: E402
from benchlib.forwarders import PEERS  # noqa: E402
from benchlib.settings import Settings  # noqa: E402


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="short runs, one repeat, 500 idle connections (well under a minute)")
    parser.add_argument("--out", type=Path, default=HERE / "results",
                        help="directory for latest.md and latest.json")
    parser.add_argument("--repeats", type=int, default=None,
                        help="rounds over every forwarder (default 3, quick 1)")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=None,
                        help="forwarder on CPU 0, load and backends on CPU 1 "
                             "(default: on when the machine has exactly 2 CPUs)")
    parser.add_argument("--only", default="", metavar="NAME,...",
                        help="measure just these forwarders (direct, haproxy and nginx always "
                             "run: the ratios need them)")
    parser.add_argument("--no-install", action="store_true",
                        help="do not apt-get install missing peers")
    parser.add_argument("--in-netns", action="store_true",
                        help="already in a private network namespace: do not unshare again")
    return parser.parse_args(argv)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    args = _parse(argv)
    only = frozenset(filter(None, args.only.split(",")))
    unknown = only - {peer.name for peer in PEERS}
    if unknown:
        print(f"--only: unknown forwarder(s) {', '.join(sorted(unknown))}; known: "
              f"{', '.join(peer.name for peer in PEERS)}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("the benchmark needs root (unshare --net, sysctls, package installs)",
              file=sys.stderr)
        return 2
    if not (args.in_netns or netns.in_private_netns()):
        # Install while the host's network is still reachable, then move into the namespace.
        packages.ensure_installed(allow_install=not args.no_install)
        return netns.reexec_in_netns(Path(__file__).resolve(), argv)
    others = netns.foreign_interfaces()
    if others:
        print(f"refusing to tune a network namespace that has other interfaces "
              f"({', '.join(others)}): run without --in-netns, or in a namespace of your "
              "own (unshare --net)", file=sys.stderr)
        return 2
    # SIGTERM (or our parent dying) unwinds like Ctrl-C, so every started process is stopped.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    procs.die_with_parent(signal.SIGTERM)
    if args.in_netns:
        packages.ensure_installed(allow_install=not args.no_install)
    netns.setup_namespace()
    cpus = sorted(os.sched_getaffinity(0))
    want_pin = args.pin if args.pin is not None else len(cpus) == 2
    if want_pin and len(cpus) < 2:
        print("--pin needs at least 2 CPUs; running unpinned", file=sys.stderr)
    pin = (cpus[0], cpus[1]) if want_pin and len(cpus) >= 2 else None
    settings = Settings.make(quick=args.quick, repeats=args.repeats, pin=pin,
                             out_dir=args.out.resolve(), build_dir=HERE / "build",
                             only=only)
    summary = runner.run(settings, HERE.parent)
    print(report.write(summary, settings.out_dir))
    print(f"written to {settings.out_dir}/latest.md and latest.json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Print every snapshot of ``portproxy.netlink.watch_addresses`` as one JSON line.

Usage (inside a namespace): ``python -m tests.netns.watch_probe IFNAME [any|ipv4|ipv6]``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import cast

from portproxy.netlink import Family, watch_addresses


async def main(name: str, family: Family) -> None:
    async for snapshot in watch_addresses(name, family):
        record = {
            "exists": snapshot.exists,
            "up": snapshot.up,
            "index": snapshot.index,
            "addresses": snapshot.sorted_addresses(),
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], cast(Family, sys.argv[2] if len(sys.argv) > 2 else "any")))

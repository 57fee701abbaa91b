"""A search web page over the gRPC search replicas: `genius ui`, `genius serve local --ui`.

`start_ui(address, shards, host, port)` serves it from a background thread and returns a handle
with `.url` and `.stop()`. The page (cluster/ui/static: plain HTML, CSS and JavaScript, no build
step, nothing fetched from the internet) searches by text, image or both, and shows hits as
thumbnails and snippets read from the shards the index was built from (cluster.ui.shard_media).
"""
from __future__ import annotations

__all__ = ["start_ui", "UIServer"]


def __getattr__(name: str):
    # aiohttp and grpc load with the server, not when the CLI imports this package.
    if name in __all__:
        from cluster.ui import server

        return getattr(server, name)
    raise AttributeError(name)

"""The committed gRPC/protobuf modules are exactly what the pinned grpcio-tools generates."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedloom.server.protogen import OUTPUTS, PROTO_DIR, generate


def test_generated_code_is_current(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    fresh = generate(tmp_path)
    for name in OUTPUTS:
        committed = (PROTO_DIR / name).read_text()
        assert committed == fresh[name], f"{name} is stale: run `python -m fedloom.server.protogen`"

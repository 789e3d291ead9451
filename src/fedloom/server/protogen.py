"""Generate the gRPC/protobuf Python modules from ``transport/proto/fedloom.proto``.

The generated ``fedloom_pb2.py`` and ``fedloom_pb2_grpc.py`` are committed; a test checks
they are what this script produces with the pinned grpcio-tools. Run
``python -m fedloom.server.protogen`` after changing the .proto file.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parents[1] / "transport" / "proto"
PROTO = PROTO_DIR / "fedloom.proto"
OUTPUTS = ("fedloom_pb2.py", "fedloom_pb2_grpc.py")

__all__ = ["OUTPUTS", "PROTO", "generate"]


def _fix_import(text: str) -> str:
    # protoc writes a top-level import; the modules live inside fedloom.transport.proto.
    return text.replace("import fedloom_pb2 as fedloom__pb2", "from fedloom.transport.proto import fedloom_pb2 as fedloom__pb2")


def generate(out_dir: Path) -> dict[str, str]:
    """Run protoc (from grpcio-tools) on the .proto file; return ``{file name: text}`` and write them to ``out_dir``."""
    from grpc_tools import protoc  # test/dev dependency only

    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main(
            ["protoc", f"-I{PROTO_DIR}", f"--python_out={tmp}", f"--grpc_python_out={tmp}", str(PROTO)]
        )
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}")
        texts = {name: _fix_import((Path(tmp) / name).read_text()) for name in OUTPUTS}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (out_dir / name).write_text(text)
    return texts


if __name__ == "__main__":
    generate(PROTO_DIR)
    print(f"generated {', '.join(OUTPUTS)} in {PROTO_DIR}", file=sys.stderr)

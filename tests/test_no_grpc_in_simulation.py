"""DESIGN.md: ``import fedloom`` and a simulation import no grpc, protobuf or cryptography."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import fedloom

    heavy = ("grpc", "google.protobuf", "cryptography")
    after_import = sorted(m for m in sys.modules if m.split(".")[0] in ("grpc", "cryptography") or m.startswith("google.protobuf"))
    cfg = fedloom.parse_config({
        "run": {"name": "no-grpc", "seed": 0, "rounds": 1, "engine": "sequential"},
        "data": {"name": "hospital"},
        "model": {"name": "linear"},
        "strategy": {"name": "fedavg", "fraction": 1.0},
        "client": {"epochs": 1, "batch_size": 256, "lr": 0.01},
    })
    run = fedloom.build_run(cfg)
    history = run.federation.run(cfg.run.rounds)
    loaded = [m for m in heavy if m in sys.modules]
    print(json.dumps({"rounds": len(history), "engine": run.engine.name, "after_import": after_import, "loaded": loaded}))
    """
)


def test_a_simulation_imports_no_grpc_protobuf_or_cryptography() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["rounds"] == 1 and out["engine"] == "sequential"
    assert out["after_import"] == []
    assert out["loaded"] == [], f"a simulation imported {out['loaded']}"

"""Regenerate the Python protobuf/gRPC code beside the .proto files.

Run `python protos/generate.py` after editing a .proto; tests/test_layout_rules.py fails when the
committed code is stale.
"""

import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = ["omnibus/v1/generation.proto"]


def generate(out_dir: Path = PROTO_ROOT) -> None:
    """Write generation_pb2.py, .pyi and _pb2_grpc.py for every proto into out_dir."""
    include = str(Path(protoc.__file__).parent / "_proto")
    for proto in PROTO_FILES:
        code = protoc.main([
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(PROTO_ROOT / proto),
        ])
        if code != 0:
            sys.exit(f"protoc failed on {proto}")


if __name__ == "__main__":
    generate()

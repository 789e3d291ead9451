"""Generated protobuf/gRPC modules of fedloom's wire protocol (see fedloom.proto)."""

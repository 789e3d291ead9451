"""The transport between a server and its clients: everything both ends share.

* ``proto/`` — the gRPC schema (``fedloom.proto``) and its generated modules;
* :mod:`~fedloom.transport.wire` — messages as checksummed chunk streams, the defensive decoder;
* :mod:`~fedloom.transport.codec` — the one codec between round messages
  (:class:`~fedloom.core.types.ClientInstruction`, :class:`~fedloom.core.types.ClientUpdate`)
  and a message's kind, JSON metadata and tensors;
* :mod:`~fedloom.transport.protocol` — message kinds, channel options, the model-layout digest;
* :mod:`~fedloom.transport.signing` and :mod:`~fedloom.transport.credentials` — ECDSA
  signatures of results, and the TLS material each end loads.

The only package besides ``server`` and ``agent`` that imports grpc, protobuf or
cryptography; nothing here is imported by ``import fedloom`` or a simulation, so this
``__init__`` imports none of its modules.
"""

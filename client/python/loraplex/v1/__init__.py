"""The loraplex.v1 protos: ``inference_pb2``, ``adapters_pb2`` and their ``*_pb2_grpc`` stubs.

These modules (and their ``.pyi`` type stubs) are generated from the repository's
``proto/loraplex/v1/*.proto`` by grpcio-tools when the package is built or installed
(``setup.py``); they are not in version control. Most code needs only :mod:`loraplex`.
"""

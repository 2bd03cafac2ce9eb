"""Generated gRPC stubs of the ``arcsim.v1`` wire protocol (``protos/arcsim/v1/*.proto``).

Do not edit the ``*_pb2*`` modules by hand: change the ``.proto`` and run
``python -m arcsim.protos_build`` (``--check`` tells whether they are up to date).

    from arcsim.v1 import coordinator_pb2, coordinator_pb2_grpc
"""

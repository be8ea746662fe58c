"""The eagle-grpc server: settings, servicer, converters, errors, interceptors, engine."""

__version__ = "0.1.0"

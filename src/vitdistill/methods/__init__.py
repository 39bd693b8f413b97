from . import dearkd, deit, feature_mse, kd, spectralkd, vanilla  # noqa: F401  (registers the methods)
from .base import Distiller, MethodError, build_method, get_method, list_methods, register_method

__all__ = ["Distiller", "MethodError", "build_method", "get_method", "list_methods", "register_method"]

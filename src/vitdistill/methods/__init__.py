from . import dearkd, deit, feature_mse, kd, spectralkd, vanilla  # noqa: F401  (registers the methods)
from .base import (
    Distiller,
    LayerPairParams,
    LogitKDParams,
    MethodError,
    MethodParams,
    TeacherOutputs,
    build_method,
    get_method,
    list_methods,
    parse_method_params,
    register_method,
)

__all__ = ["Distiller", "LayerPairParams", "LogitKDParams", "MethodError", "MethodParams", "TeacherOutputs",
           "build_method",            "get_method", "list_methods", "parse_method_params", "register_method"]

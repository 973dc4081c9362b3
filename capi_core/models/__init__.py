"""CAPI networks: the timm ViT encoder, the cross-attention predictor, the two heads and the student."""

from capi_core.models.encoder import Encoder
from capi_core.models.heads import ClusteringHead, StudentHead
from capi_core.models.predictor import Predictor
from capi_core.models.student import Student, param_groups

__all__ = ["ClusteringHead", "Encoder", "Predictor", "Student", "StudentHead", "param_groups"]

"""Reference models for tests, scenarios and the paper's setting."""

from .cnn import CNNBN, FlowerCNN
from .cnn1d import CNN1d
from .mlp import MLP, FixedReadout, ShallowReLU
from .resnet import PreActBlock, PreActResNet, resnet18_shaped
from .transformer import HandAttentionTransformer, MHATransformer, SelfAttention

__all__ = [
    "MLP",
    "FixedReadout",
    "ShallowReLU",
    "FlowerCNN",
    "CNNBN",
    "CNN1d",
    "PreActBlock",
    "PreActResNet",
    "resnet18_shaped",
    "SelfAttention",
    "HandAttentionTransformer",
    "MHATransformer",
]

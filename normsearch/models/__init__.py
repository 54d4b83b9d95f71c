"""CNNs with normalization slots: CIFAR ResNet-20/32/56, VGG-13, LeNet and the papers' small CNNs.

Every model is built by :func:`create_model` and takes ``norm_layer``, a callable
``norm_layer(num_features) -> nn.Module`` called once per normalization slot; each slot is a
direct attribute of its parent, so :mod:`normsearch.space.surgery` can find and replace it by its
``named_modules()`` label.
"""

from normsearch.models import resnet, small, vgg  # noqa: F401  (registers the models)
from normsearch.models._registry import create_model, list_models, register_model, resolve_norm_layer
from normsearch.models.resnet import CifarResNet
from normsearch.models.small import LeNet, MixtureNormCNN, StandardizationLossCNN
from normsearch.models.vgg import VGG

__all__ = [
    "create_model",
    "list_models",
    "register_model",
    "resolve_norm_layer",
    "CifarResNet",
    "VGG",
    "LeNet",
    "MixtureNormCNN",
    "StandardizationLossCNN",
]

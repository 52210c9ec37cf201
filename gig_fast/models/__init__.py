"""Models: the demo network, adapters naming analysed points and BN shifts, weight loading."""
from .adapters import ForwardRecord, ResNetAdapter, get_adapter
from .bn import bn_affine, ensure_eval, fold_batchnorm
from .demo import (DEMO_MEAN, DEMO_STD, DEMO_TRAINING, FASHION_CLASSES, SHIPPED_DEMO_WEIGHTS, DemoResNet, default_demo_path,
                   load_demo, shipped_demo_info, train_demo)
from .loading import TORCHVISION_RESNETS, load_model

__all__ = ["DemoResNet", "train_demo", "load_demo", "default_demo_path", "shipped_demo_info", "SHIPPED_DEMO_WEIGHTS",
           "DEMO_TRAINING", "FASHION_CLASSES", "DEMO_MEAN",
           "DEMO_STD", "ResNetAdapter", "ForwardRecord", "get_adapter", "bn_affine", "ensure_eval", "fold_batchnorm",
           "load_model", "TORCHVISION_RESNETS"]

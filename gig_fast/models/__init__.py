"""Models: the demo network, adapters naming analysed points and BN shifts, weight loading."""
from .adapters import ForwardRecord, ResNetAdapter, get_adapter
from .bn import bn_affine, ensure_eval, fold_batchnorm
from .demo import DEMO_MEAN, DEMO_STD, FASHION_CLASSES, DemoResNet, default_demo_path, load_demo, train_demo
from .loading import TORCHVISION_RESNETS, load_model

__all__ = ["DemoResNet", "train_demo", "load_demo", "default_demo_path", "FASHION_CLASSES", "DEMO_MEAN",
           "DEMO_STD", "ResNetAdapter", "ForwardRecord", "get_adapter", "bn_affine", "ensure_eval", "fold_batchnorm",
           "load_model", "TORCHVISION_RESNETS"]

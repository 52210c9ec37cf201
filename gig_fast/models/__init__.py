"""Models: the demo networks (ResNet, ViT), adapters naming analysed points and their β, weight loading."""
from .adapters import ForwardRecord, ResNetAdapter, get_adapter
from .bn import bn_affine, ensure_eval, fold_batchnorm
from .demo import (DEMO_MEAN, DEMO_STD, DEMO_TRAINING, FASHION_CLASSES, SHIPPED_DEMO_WEIGHTS, DemoResNet, default_demo_path,
                   load_demo, shipped_demo_info, train_demo)
from .demo_vit import default_demo_vit_path, demo_vit, load_demo_vit, train_demo_vit
from .loading import TORCHVISION_RESNETS, load_model, load_state_dict, model_preprocessing
from .transformer import TransformerAdapter, is_transformer

__all__ = ["DemoResNet", "train_demo", "load_demo", "default_demo_path", "shipped_demo_info", "SHIPPED_DEMO_WEIGHTS",
           "DEMO_TRAINING", "FASHION_CLASSES", "DEMO_MEAN",
           "DEMO_STD", "ResNetAdapter", "ForwardRecord", "get_adapter", "bn_affine", "ensure_eval", "fold_batchnorm",
           "load_model", "TORCHVISION_RESNETS", "load_state_dict", "model_preprocessing", "demo_vit",
           "default_demo_vit_path", "train_demo_vit", "load_demo_vit", "TransformerAdapter", "is_transformer"]
